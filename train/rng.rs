//! Seeded draws from libtorch's random generator, one seeded sequence at a time.
//!
//! tch exposes no per-call `Generator`, only the process-wide default generators. Two threads
//! drawing from them interleave, so a seeded sampler (or a seeded head initialisation) would give
//! different numbers depending on what else runs: the test suite's threads, or a host program
//! that decodes in parallel. [`seeded`] makes a seeded sequence exclusive: it takes a process-wide
//! lock, seeds the generators, runs the closure and releases the lock, so the same seed always
//! gives the same draws ([`hold`] does the same for the rest of a scope). It is reentrant on one thread (a seeded generation that initialises a
//! seeded head nests without deadlock; the inner seed then restarts the sequence, as a plain
//! `manual_seed` would).

use std::cell::Cell;
use std::sync::{Mutex, MutexGuard};

static GLOBAL_RNG: Mutex<()> = Mutex::new(());

thread_local! {
    static HELD: Cell<bool> = const { Cell::new(false) };
}

/// A seeded section: while it lives, libtorch's generators are this section's alone. Dropping
/// it lets the next section draw.
pub struct SeededScope {
    guard: Option<MutexGuard<'static, ()>>,
}

impl Drop for SeededScope {
    fn drop(&mut self) {
        if self.guard.take().is_some() {
            HELD.with(|h| h.set(false));
        }
    }
}

/// Seeds libtorch's generators with `seed` and holds them until the returned scope is dropped.
pub fn hold(seed: i64) -> SeededScope {
    if HELD.with(Cell::get) {
        tch::manual_seed(seed);
        return SeededScope { guard: None };
    }
    // A panic inside another section poisons the lock, but the guarded data is `()`: go on.
    let guard = GLOBAL_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    HELD.with(|h| h.set(true));
    tch::manual_seed(seed);
    SeededScope { guard: Some(guard) }
}

/// Runs `f` with libtorch's generators seeded with `seed` and no other seeded section drawing
/// at the same time.
pub fn seeded<T>(seed: i64, f: impl FnOnce() -> T) -> T {
    let _scope = hold(seed);
    f()
}

/// [`seeded`] when `draws` (a sampling run), plain `f()` otherwise: greedy decoding draws
/// nothing, so it need not wait for the lock.
pub fn seeded_if<T>(draws: bool, seed: i64, f: impl FnOnce() -> T) -> T {
    if draws {
        seeded(seed, f)
    } else {
        f()
    }
}
