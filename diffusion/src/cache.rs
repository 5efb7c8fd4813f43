//! Loaded models kept within a memory budget; the least recently used model
//! is evicted first. A model larger than the whole budget is still loaded
//! (alone), with a warning.

use std::sync::Arc;

/// One cached model.
struct Entry<T> {
    key: String,
    value: Arc<T>,
    bytes: u64,
    last_used: u64,
}

pub struct ModelCache<T> {
    budget: u64,
    entries: Vec<Entry<T>>,
    clock: u64,
}

impl<T> ModelCache<T> {
    pub fn new(budget_bytes: u64) -> Self {
        Self {
            budget: budget_bytes,
            entries: Vec::new(),
            clock: 0,
        }
    }

    /// The cached model for `key`, or the one `load` makes (evicting least
    /// recently used models until `bytes` fits).
    pub fn get_or_load<E>(
        &mut self,
        key: &str,
        bytes: u64,
        load: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.key == key) {
            e.last_used = self.clock;
            return Ok(e.value.clone());
        }
        while !self.entries.is_empty() && self.used() + bytes > self.budget {
            let lru = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
                .expect("non-empty");
            let gone = self.entries.remove(lru);
            tracing::info!(model = %gone.key, bytes = gone.bytes, "evicting model from the cache");
        }
        if bytes > self.budget {
            tracing::warn!(
                model = key,
                bytes,
                budget = self.budget,
                "model is larger than the cache budget"
            );
        }
        let value = Arc::new(load()?);
        self.entries.push(Entry {
            key: key.to_string(),
            value: value.clone(),
            bytes,
            last_used: self.clock,
        });
        Ok(value)
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Keys held, most recently used first.
    pub fn held(&self) -> Vec<String> {
        let mut v: Vec<&Entry<T>> = self.entries.iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.last_used));
        v.into_iter().map(|e| e.key.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_model_is_evicted_to_fit_the_budget() {
        let mut c = ModelCache::new(100);
        let mut loads = 0;
        let get = |c: &mut ModelCache<String>, k: &str, loads: &mut i32| {
            c.get_or_load(k, 40, || {
                *loads += 1;
                Ok::<_, ()>(k.to_uppercase())
            })
            .unwrap()
        };
        assert_eq!(*get(&mut c, "a", &mut loads), "A");
        get(&mut c, "b", &mut loads);
        get(&mut c, "a", &mut loads); // a is now the most recent
        assert_eq!(loads, 2);
        get(&mut c, "c", &mut loads); // 120 > 100: b goes
        assert_eq!(c.held(), vec!["c", "a"]);
        assert_eq!(c.used(), 80);
        get(&mut c, "b", &mut loads);
        assert_eq!(loads, 4);
        assert_eq!(c.held(), vec!["b", "c"]);
    }

    #[test]
    fn a_failed_load_leaves_the_cache_as_it_was() {
        let mut c: ModelCache<u8> = ModelCache::new(100);
        c.get_or_load("a", 10, || Ok::<_, String>(1)).unwrap();
        let err = c
            .get_or_load("b", 10, || Err("corrupt".to_string()))
            .unwrap_err();
        assert_eq!(err, "corrupt");
        assert_eq!(c.held(), vec!["a"]);
    }
}
