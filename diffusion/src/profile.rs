//! Where a UNet call spends its time: named sections of the forward pass,
//! timed with the device synchronised on entry and exit, while a
//! [`profile`] call is running on this thread. Synchronising removes the
//! overlap of kernel launches with execution, so the sections add up to
//! more than an unprofiled call; their shares are what this is for. With no
//! profile running a section costs one thread-local lookup.

use std::cell::RefCell;
use std::time::Instant;

use candle_core::Device;

/// Time spent in one section, over all its calls.
#[derive(Debug, Clone, PartialEq)]
pub struct SectionTime {
    /// `resnet`, `transformer`, `transformer/self-attention`, …; a name with
    /// a `/` is part of the section before the slash.
    pub name: &'static str,
    pub calls: u32,
    pub seconds: f64,
}

struct Profiler {
    device: Device,
    sections: Vec<SectionTime>,
}

thread_local! {
    static ACTIVE: RefCell<Option<Profiler>> = const { RefCell::new(None) };
}

fn sync() {
    ACTIVE.with(|p| {
        if let Some(p) = p.borrow().as_ref() {
            // A failed synchronisation surfaces in the section's own result.
            let _ = p.device.synchronize();
        }
    })
}

fn active() -> bool {
    ACTIVE.with(|p| p.borrow().is_some())
}

/// Whether a [`profile`] call is running on this thread.
pub(crate) fn running() -> bool {
    active()
}

/// Runs `f` as the section `name` of the running profile (or just runs it).
pub(crate) fn section<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    if !active() {
        return f();
    }
    sync();
    let started = Instant::now();
    let out = f();
    sync();
    let seconds = started.elapsed().as_secs_f64();
    ACTIVE.with(|p| {
        if let Some(p) = p.borrow_mut().as_mut() {
            match p.sections.iter_mut().find(|s| s.name == name) {
                Some(s) => {
                    s.calls += 1;
                    s.seconds += seconds;
                }
                None => p.sections.push(SectionTime {
                    name,
                    calls: 1,
                    seconds,
                }),
            }
        }
    });
    out
}

/// Runs `f` with sections timed on `device`; returns its result and the
/// sections in the order first entered. Profiles do not nest.
pub fn profile<T>(device: &Device, f: impl FnOnce() -> T) -> (T, Vec<SectionTime>) {
    ACTIVE.with(|p| {
        *p.borrow_mut() = Some(Profiler {
            device: device.clone(),
            sections: Vec::new(),
        })
    });
    let out = f();
    let sections = ACTIVE
        .with(|p| p.borrow_mut().take())
        .map(|p| p.sections)
        .unwrap_or_default();
    (out, sections)
}

/// Seconds in the top-level sections (names without a `/`): the profiled
/// call's total, each part counted once.
pub fn top_level_seconds(sections: &[SectionTime]) -> f64 {
    sections
        .iter()
        .filter(|s| !s.name.contains('/'))
        .map(|s| s.seconds)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_count_calls_and_nest_only_while_profiling() {
        let spin = |ms: u64| std::thread::sleep(std::time::Duration::from_millis(ms));
        assert_eq!(section("outside", || 7), 7);
        let (v, s) = profile(&Device::Cpu, || {
            for _ in 0..3 {
                section("outer", || section("outer/inner", || spin(2)));
            }
            section("other", || spin(1));
            42
        });
        assert_eq!(v, 42);
        let names: Vec<_> = s.iter().map(|s| (s.name, s.calls)).collect();
        assert_eq!(names, [("outer/inner", 3), ("outer", 3), ("other", 1)]);
        assert!(s[1].seconds >= s[0].seconds && s[0].seconds >= 0.006);
        // The nested section is not counted twice in the total.
        let total = top_level_seconds(&s);
        assert_eq!(total, s[1].seconds + s[2].seconds);
        // Nothing is recorded once the profile has returned.
        assert_eq!(section("outside", || 8), 8);
        let (_, s) = profile(&Device::Cpu, || ());
        assert!(s.is_empty());
    }
}
