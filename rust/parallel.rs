//! The one threading harness of the crate: scoped threads, results collected in order, a
//! panicked worker turned into [`Error::Internal`] (never a panic across the binding).
//!
//! Work is split in two ways. [`map`] gives each thread its own piece, known up front (blocks of
//! rows of an evaluation, disjoint output slices). [`claims`] lets threads take numbered pieces
//! from a shared counter in increasing order, each thread with its own state (the one pass of a
//! search over the database); it looks at [`Control::cancel`] between pieces. Both create their
//! threads per call: calls are long (a pass over a store), so a pool would save nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::ScopedJoinHandle;

use crate::error::{Error, Result};

/// Shared state between long work and whoever watches it: rows done so far, and a flag that
/// asks the work to stop (Ctrl-C).
#[derive(Default)]
pub struct Control {
    pub done_rows: AtomicU64,
    pub cancel: AtomicBool,
}

impl Control {
    /// Counts `rows` more rows done.
    #[inline]
    pub fn advance(&self, rows: usize) {
        self.done_rows.fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// Whether the watcher asked the work to stop.
    #[inline]
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// The most threads a `threads` argument may ask for (more is a mistake, such as a negative
/// number wrapped around, not a machine).
pub const MAX_THREADS: usize = 1024;

/// The threads a `threads` argument asks for: 0 means all cores; more than [`MAX_THREADS`] is
/// refused.
pub fn resolve_threads(threads: usize) -> Result<usize> {
    match threads {
        0 => Ok(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        t if t > MAX_THREADS => Err(Error::invalid(format!("threads: at most 1,024, got {t}"))),
        t => Ok(t),
    }
}

/// What a scoped thread returned; its panic as an internal error.
pub fn join<T>(handle: ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    handle.join().unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("no message");
        Err(Error::Internal(format!("a worker thread panicked: {what}")))
    })
}

/// Runs `work(item)` for every item on a thread of its own; the results in item order, or the
/// error of the first item that failed (in item order, whichever thread finished first).
pub fn map<I: Send, T: Send>(
    items: impl IntoIterator<Item = I>,
    work: impl Fn(I) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items.into_iter().map(|item| scope.spawn(move || work(item))).collect();
        // every thread joined before the first error is returned: a panicked thread left to
        // the scope would panic the scope itself
        let results: Vec<Result<T>> = handles.into_iter().map(join).collect();
        results.into_iter().collect()
    })
}

/// Runs `work(state, lo, hi)` over `0..n` in claims of `claim` items (the last one shorter),
/// taken in increasing order by up to `threads` threads (0: all cores), thread `i` with its own
/// `state(i)`; returns the states in thread order. Stops at the next claim once `control` is
/// cancelled, with [`Error::Cancelled`].
pub fn claims<S: Send>(
    n: usize,
    claim: usize,
    threads: usize,
    control: &Control,
    state: impl Fn(usize) -> S + Sync,
    work: impl Fn(&mut S, usize, usize) -> Result<()> + Sync,
) -> Result<Vec<S>> {
    let count = n.div_ceil(claim);
    let next = AtomicUsize::new(0);
    let threads = resolve_threads(threads)?.min(count.max(1));
    map(0..threads, |me| {
        let mut own = state(me);
        loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= count {
                return Ok(own);
            }
            if control.cancelled() {
                return Err(Error::Cancelled);
            }
            work(&mut own, c * claim, ((c + 1) * claim).min(n))?;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_in_order_and_the_first_error_wins() {
        let squares = map(0..5usize, |i| Ok(i * i)).unwrap();
        assert_eq!(squares, [0, 1, 4, 9, 16]);
        let failed = map(0..5usize, |i| match i {
            1 | 3 => Err(Error::invalid(format!("item {i}"))),
            _ => Ok(i),
        });
        assert!(matches!(failed, Err(Error::Invalid(m)) if m == "item 1"));
    }

    #[test]
    fn a_panicking_worker_is_an_internal_error() {
        let got = map(0..3usize, |i| if i == 1 { panic!("boom {i}") } else { Ok(i) });
        match got {
            Err(e @ Error::Internal(_)) => {
                let text = e.to_string();
                assert!(text.contains("boom 1") && text.contains("bug"), "{text}");
            }
            other => panic!("expected an internal error, got {:?}", other.map(|_| ())),
        }
        let control = Control::default();
        let got = claims(
            100,
            7,
            3,
            &control,
            |_| (),
            |_, lo, _| {
                assert!(lo < 50, "row {lo}");
                Ok(())
            },
        );
        assert!(matches!(got, Err(Error::Internal(_))));
    }

    #[test]
    fn thread_counts_are_bounded() {
        assert!(resolve_threads(0).unwrap() >= 1);
        assert_eq!(resolve_threads(1024).unwrap(), 1024);
        let e = resolve_threads(1025).unwrap_err().to_string();
        assert_eq!(e, "threads: at most 1,024, got 1025");
        let got = claims(10, 1, usize::MAX, &Control::default(), |_| (), |_, _, _| Ok(()));
        assert!(matches!(got, Err(Error::Invalid(_))));
    }

    #[test]
    fn claims_cover_every_item_once_and_stop_when_cancelled() {
        let control = Control::default();
        let parts = claims(
            1000,
            64,
            4,
            &control,
            |_| Vec::new(),
            |seen, lo, hi| {
                seen.extend(lo..hi);
                control.advance(hi - lo);
                Ok(())
            },
        )
        .unwrap();
        let mut all: Vec<usize> = parts.into_iter().flatten().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(control.done_rows.load(Ordering::Relaxed), 1000);
        control.cancel.store(true, Ordering::Relaxed);
        let stopped = claims(1000, 64, 2, &control, |_| (), |_, _, _| Ok(()));
        assert!(matches!(stopped, Err(Error::Cancelled)));
        // nothing to do: one thread, its fresh state
        assert_eq!(
            claims(0, 64, 4, &Control::default(), |_| 7, |_, _, _| Ok(())).unwrap(),
            [7]
        );
    }
}
