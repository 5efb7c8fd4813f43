//! The audit ledger's Merkle tree: the sealed entries, in chain order, as
//! the leaves of a binary hash tree shaped as RFC 6962 (Certificate
//! Transparency) shapes it, so that one signed root vouches for every entry
//! up to a checkpoint and a short path proves any one of them.
//!
//! The hash chain ([`crate::ledger`]) lets an auditor who reads *every*
//! entry prove nothing was changed; the tree lets a tenant prove its own
//! entries are in the signed ledger without reading anyone else's (an
//! inclusion proof: about log₂ n hashes), and anyone holding an older
//! signed root prove the ledger only grew since (a consistency proof).
//!
//! Leaf `i` (entry `i + 1`) hashes its entry's chain hash; the tree of `n`
//! leaves splits at the largest power of two below `n`. Leaves and inner
//! nodes hash with different prefixes, so no leaf can pose as a subtree.
//! Every perfect subtree the coordinator stores is a [`NodeId`]: the nodes
//! a tree's size decomposes into (its [`Frontier`]) never change as it
//! grows, which is what lets the coordinator append leaves by storing only
//! the nodes they complete.

use sha2::{Digest, Sha256};

/// A node's hash.
pub type Hash = [u8; 32];

const LEAF_PREFIX: u8 = 0;
const NODE_PREFIX: u8 = 1;

/// The leaf of the entry whose chain hash is `entry_hash`.
pub fn leaf(entry_hash: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([LEAF_PREFIX]);
    h.update(entry_hash);
    h.finalize().into()
}

/// The leaf of the entry whose chain hash is the hex `entry_hash`.
pub fn leaf_of_hex(entry_hash: &str) -> Result<Hash, String> {
    Ok(leaf(&from_hex(entry_hash)?))
}

/// An inner node over its two children.
pub fn interior(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([NODE_PREFIX]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Lower-case hex, as the ledger writes hashes.
pub fn to_hex(h: &Hash) -> String {
    hex::encode(h)
}

/// A hash from 64 hex digits.
pub fn from_hex(s: &str) -> Result<Hash, String> {
    let bytes = hex::decode(s).map_err(|_| format!("{s:?} is not a hex hash"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{s:?} is not a 32-byte hash"))
}

/// A perfect subtree: leaves `index · 2^level` up to, not including,
/// `(index + 1) · 2^level`. Level 0 holds the leaves themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    pub level: u32,
    pub index: u64,
}

/// The largest power of two strictly below `n` (n ≥ 2): where RFC 6962
/// splits a tree of `n` leaves.
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// The hash of leaves `a..b` (a non-empty range the tree's recursion
/// reaches: a perfect aligned one is a stored node, any other splits).
fn range_hash(a: u64, b: u64, node: &mut dyn FnMut(NodeId) -> Hash) -> Hash {
    let n = b - a;
    if n.is_power_of_two() && a.is_multiple_of(n) {
        let level = n.trailing_zeros();
        return node(NodeId {
            level,
            index: a >> level,
        });
    }
    let k = split(n);
    let left = range_hash(a, a + k, node);
    let right = range_hash(a + k, b, node);
    interior(&left, &right)
}

/// The root of the tree of the first `size` leaves (size ≥ 1), from its
/// stored nodes (the coordinator keeps a [`Frontier`] instead; this checks
/// the two agree).
#[cfg(test)]
fn root(size: u64, node: &mut dyn FnMut(NodeId) -> Hash) -> Hash {
    range_hash(0, size, node)
}

/// The proof that leaf `index` is in the tree of the first `size` leaves:
/// the sibling hashes from the leaf up, RFC 6962's `PATH(m, D[n])`.
pub fn inclusion_proof(index: u64, size: u64, node: &mut dyn FnMut(NodeId) -> Hash) -> Vec<Hash> {
    fn path(m: u64, a: u64, b: u64, node: &mut dyn FnMut(NodeId) -> Hash, out: &mut Vec<Hash>) {
        if b - a == 1 {
            return;
        }
        let k = split(b - a);
        if m < a + k {
            path(m, a, a + k, node, out);
            out.push(range_hash(a + k, b, node));
        } else {
            path(m, a + k, b, node, out);
            out.push(range_hash(a, a + k, node));
        }
    }
    assert!(index < size, "leaf {index} is not in a tree of {size}");
    let mut out = Vec::new();
    path(index, 0, size, node, &mut out);
    out
}

/// The root that `proof` leads to from `leaf` at `index` in a tree of
/// `size` leaves; `None` when the proof has the wrong length for them.
pub fn root_from_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash]) -> Option<Hash> {
    if index >= size {
        return None;
    }
    if size == 1 {
        return proof.is_empty().then_some(*leaf);
    }
    let (top, below) = proof.split_last()?;
    let k = split(size);
    Some(if index < k {
        interior(&root_from_inclusion(index, k, leaf, below)?, top)
    } else {
        interior(top, &root_from_inclusion(index - k, size - k, leaf, below)?)
    })
}

/// The proof that the tree of the first `old` leaves is a prefix of the
/// tree of the first `new` (0 < old ≤ new): RFC 6962's `PROOF(m, D[n])`.
pub fn consistency_proof(old: u64, new: u64, node: &mut dyn FnMut(NodeId) -> Hash) -> Vec<Hash> {
    fn sub(
        m: u64,
        a: u64,
        b: u64,
        whole: bool,
        node: &mut dyn FnMut(NodeId) -> Hash,
        out: &mut Vec<Hash>,
    ) {
        if m == b - a {
            if !whole {
                out.push(range_hash(a, b, node));
            }
            return;
        }
        let k = split(b - a);
        if m <= k {
            sub(m, a, a + k, whole, node, out);
            out.push(range_hash(a + k, b, node));
        } else {
            sub(m - k, a + k, b, false, node, out);
            out.push(range_hash(a, a + k, node));
        }
    }
    assert!(
        0 < old && old <= new,
        "no consistency proof from {old} to {new}"
    );
    let mut out = Vec::new();
    sub(old, 0, new, true, node, &mut out);
    out
}

/// Whether `proof` shows the tree of `old` leaves with root `old_root` to
/// be a prefix of the tree of `new` leaves with root `new_root`.
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    /// The old and new subtree roots the proof's tail leads to.
    fn roots(m: u64, n: u64, whole: bool, old_root: &Hash, proof: &[Hash]) -> Option<(Hash, Hash)> {
        if m == n {
            return match (whole, proof) {
                (true, []) => Some((*old_root, *old_root)),
                (false, [only]) => Some((*only, *only)),
                _ => None,
            };
        }
        let (top, below) = proof.split_last()?;
        let k = split(n);
        if m <= k {
            let (o, n) = roots(m, k, whole, old_root, below)?;
            Some((o, interior(&n, top)))
        } else {
            let (o, n) = roots(m - k, n - k, false, old_root, below)?;
            Some((interior(top, &o), interior(top, &n)))
        }
    }
    if old == 0 || old > new {
        return false;
    }
    roots(old, new, true, old_root, proof).is_some_and(|(o, n)| o == *old_root && n == *new_root)
}

/// The nodes a proof (or root) needs, found by running it with every
/// node's hash unknown: the coordinator fetches exactly these.
pub fn nodes_needed(run: impl FnOnce(&mut dyn FnMut(NodeId) -> Hash)) -> Vec<NodeId> {
    let mut seen = Vec::new();
    run(&mut |id| {
        seen.push(id);
        [0; 32]
    });
    seen.sort_unstable();
    seen.dedup();
    seen
}

/// The right edge of a growing tree: the perfect subtrees its size
/// decomposes into, largest first (one per bit set in the size). Appending
/// a leaf merges the equal-sized ones at its end, completing new nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    nodes: Vec<Hash>,
}

impl Frontier {
    /// The nodes a tree of `size` leaves decomposes into, largest first.
    pub fn ids(size: u64) -> Vec<NodeId> {
        let mut out = Vec::new();
        let mut start = 0;
        for level in (0..64).rev() {
            if size & (1 << level) != 0 {
                out.push(NodeId {
                    level,
                    index: start >> level,
                });
                start += 1 << level;
            }
        }
        out
    }

    /// The frontier of a tree of `size` leaves from its nodes, in the order
    /// [`Frontier::ids`] names them.
    pub fn from_nodes(size: u64, nodes: Vec<Hash>) -> Result<Self, String> {
        if nodes.len() != size.count_ones() as usize {
            return Err(format!(
                "a tree of {size} leaves has {} edge nodes, not {}",
                size.count_ones(),
                nodes.len()
            ));
        }
        Ok(Self { size, nodes })
    }

    /// Leaves so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf; returns every node it completes, the leaf first.
    pub fn push(&mut self, leaf: Hash) -> Vec<(NodeId, Hash)> {
        let mut id = NodeId {
            level: 0,
            index: self.size,
        };
        let mut cur = leaf;
        let mut done = vec![(id, cur)];
        for _ in 0..self.size.trailing_ones() {
            let left = self.nodes.pop().expect("one edge node per bit set");
            cur = interior(&left, &cur);
            id = NodeId {
                level: id.level + 1,
                index: id.index >> 1,
            };
            done.push((id, cur));
        }
        self.nodes.push(cur);
        self.size += 1;
        done
    }

    /// The tree's root; `None` while it has no leaves.
    pub fn root(&self) -> Option<Hash> {
        let (last, rest) = self.nodes.split_last()?;
        Some(rest.iter().rev().fold(*last, |acc, n| interior(n, &acc)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf(&Sha256::digest(i.to_be_bytes()).into()))
            .collect()
    }

    /// RFC 6962's MTH, straight from its definition.
    fn mth(d: &[Hash]) -> Hash {
        match d.len() {
            0 => Sha256::digest([]).into(),
            1 => d[0],
            n => {
                let k = split(n as u64) as usize;
                interior(&mth(&d[..k]), &mth(&d[k..]))
            }
        }
    }

    /// Every node a frontier completes while `n` leaves are pushed.
    fn stored(d: &[Hash]) -> (Frontier, HashMap<NodeId, Hash>) {
        let mut f = Frontier::default();
        let mut nodes = HashMap::new();
        for l in d {
            nodes.extend(f.push(*l));
        }
        (f, nodes)
    }

    #[test]
    fn the_frontier_completes_the_nodes_and_roots_of_the_definition() {
        let d = leaves(70);
        let mut f = Frontier::default();
        let mut nodes = HashMap::new();
        for (i, l) in d.iter().enumerate() {
            nodes.extend(f.push(*l));
            let n = i as u64 + 1;
            assert_eq!(f.root(), Some(mth(&d[..=i])), "root at {n}");
            assert_eq!(root(n, &mut |id| nodes[&id]), mth(&d[..=i]));
            // The edge nodes at every size are stored ones, and rebuild it.
            let edge: Vec<Hash> = Frontier::ids(n).iter().map(|id| nodes[id]).collect();
            assert_eq!(Frontier::from_nodes(n, edge).unwrap(), f);
        }
        // Each perfect node is the definition's hash of its leaves.
        for (id, h) in &nodes {
            let a = (id.index << id.level) as usize;
            assert_eq!(*h, mth(&d[a..a + (1 << id.level)]), "{id:?}");
        }
        assert_eq!(Frontier::default().root(), None);
        assert!(Frontier::from_nodes(6, vec![[0; 32]]).is_err());
    }

    #[test]
    fn every_inclusion_proof_leads_to_the_root_and_nothing_else_does() {
        let d = leaves(40);
        let (_, nodes) = stored(&d);
        for n in 1..=d.len() as u64 {
            let r = mth(&d[..n as usize]);
            for m in 0..n {
                let p = inclusion_proof(m, n, &mut |id| nodes[&id]);
                assert!(p.len() <= 64 - (n - 1).leading_zeros() as usize);
                let l = &d[m as usize];
                assert_eq!(root_from_inclusion(m, n, l, &p), Some(r), "{m} of {n}");
                // Another leaf, another position, a changed or shortened path.
                let other = &d[(m as usize + 1) % d.len()];
                assert_ne!(root_from_inclusion(m, n, other, &p), Some(r));
                if n > 1 {
                    let moved = (m + 1) % n;
                    assert_ne!(root_from_inclusion(moved, n, l, &p), Some(r), "{m} of {n}");
                    let mut bent = p.clone();
                    bent[0][0] ^= 1;
                    assert_ne!(root_from_inclusion(m, n, l, &bent), Some(r));
                    assert_eq!(root_from_inclusion(m, n, l, &p[1..]), None);
                }
                assert_eq!(root_from_inclusion(n, n, l, &p), None);
            }
        }
    }

    #[test]
    fn consistency_proofs_hold_between_every_pair_of_sizes_and_catch_a_rewrite() {
        let d = leaves(33);
        let (_, nodes) = stored(&d);
        let mut rewritten = d.clone();
        rewritten[4] = leaf(&[7; 32]);
        for n in 1..=d.len() as u64 {
            let new_root = mth(&d[..n as usize]);
            for m in 1..=n {
                let old_root = mth(&d[..m as usize]);
                let p = consistency_proof(m, n, &mut |id| nodes[&id]);
                assert!(
                    verify_consistency(m, n, &old_root, &new_root, &p),
                    "{m}→{n}"
                );
                // The same proof does not carry a different old tree, or new one.
                let other_old = mth(&rewritten[..m as usize]);
                if other_old != old_root {
                    assert!(!verify_consistency(m, n, &other_old, &new_root, &p));
                }
                assert!(!verify_consistency(m, n, &old_root, &[9; 32], &p));
                if let Some((_, short)) = p.split_last() {
                    assert!(!verify_consistency(m, n, &old_root, &new_root, short));
                }
                if m < n {
                    // A new tree whose first m leaves differ: no honest proof
                    // from the old root exists; the real one fails against it.
                    let forged_new = mth(&rewritten[..n as usize]);
                    if forged_new != new_root && m > 4 {
                        assert!(!verify_consistency(m, n, &old_root, &forged_new, &p));
                    }
                }
            }
        }
        assert!(!verify_consistency(0, 3, &[0; 32], &[0; 32], &[]));
        assert!(!verify_consistency(4, 3, &[0; 32], &[0; 32], &[]));
    }

    #[test]
    fn a_proof_asks_for_few_nodes() {
        // A proof's nodes are found before any is fetched; for a million
        // leaves a proof needs about log₂ of that, not a scan.
        let ids = nodes_needed(|node| {
            inclusion_proof(123_456, 1_000_001, node);
        });
        assert!(ids.len() <= 2 * 20, "{}", ids.len());
        let ids = nodes_needed(|node| {
            consistency_proof(999_999, 1_000_001, node);
        });
        assert!(ids.len() <= 2 * 20, "{}", ids.len());
        assert_eq!(
            Frontier::ids(6),
            vec![NodeId { level: 2, index: 0 }, NodeId { level: 1, index: 2 }]
        );
    }
}
