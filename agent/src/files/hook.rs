//! Test hooks: named points between a check and the use that follows it, where a test
//! runs the attacker's step (swap a directory for a symlink, plant a FIFO, rename a
//! symlink over the temp file) deterministically.
//!
//! Compiled only for the crate's own tests; in any other build [`at`] is an empty inline
//! function. A hook is per thread, so tests running in parallel do not see each other's.

/// Where the adapter is between a check and a use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Point {
    /// The parent directory of the target was resolved (path: the target).
    AfterResolve,
    /// The temp file is about to be created (path: the temp file's name in the directory).
    BeforeTempOpen,
    /// The temp file is written, its owner and mode are about to be set (path: temp file).
    BeforeChmod,
    /// The temp file is about to be renamed over the target (path: temp file).
    BeforeRename,
    /// The target is about to be unlinked (path: the target).
    BeforeUnlink,
    /// The target is about to be opened for reading (path: the target).
    BeforeRead,
}

#[cfg(test)]
mod imp {
    use super::Point;
    use std::cell::RefCell;
    use std::path::Path;

    type Hook = Box<dyn FnMut(Point, &Path)>;

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Installs `f` for this thread until the returned guard is dropped.
    pub(crate) fn install(f: impl FnMut(Point, &Path) + 'static) -> Guard {
        HOOK.with(|h| *h.borrow_mut() = Some(Box::new(f)));
        Guard(())
    }

    pub(crate) struct Guard(());

    impl Drop for Guard {
        fn drop(&mut self) {
            HOOK.with(|h| *h.borrow_mut() = None);
        }
    }

    pub(crate) fn at(point: Point, path: &Path) {
        // Taken out while it runs, so a hook that calls back into the adapter does not
        // re-enter itself.
        let hook = HOOK.with(|h| h.borrow_mut().take());
        if let Some(mut f) = hook {
            f(point, path);
            HOOK.with(|h| {
                let mut slot = h.borrow_mut();
                if slot.is_none() {
                    *slot = Some(f);
                }
            });
        }
    }
}

#[cfg(test)]
pub(crate) use imp::{at, install};

/// No hooks outside the crate's tests.
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn at(_point: Point, _path: &std::path::Path) {}

#[cfg(test)]
mod walk_switch {
    use std::cell::Cell;

    thread_local! {
        static FORCE_WALK: Cell<bool> = const { Cell::new(false) };
    }

    /// Makes this thread resolve with the per-component walk (as on a kernel without
    /// `openat2`) until the guard is dropped.
    pub(crate) fn force_walk(on: bool) -> WalkGuard {
        FORCE_WALK.with(|f| f.set(on));
        WalkGuard(())
    }

    pub(crate) struct WalkGuard(());

    impl Drop for WalkGuard {
        fn drop(&mut self) {
            FORCE_WALK.with(|f| f.set(false));
        }
    }

    pub(crate) fn walk_forced() -> bool {
        FORCE_WALK.with(Cell::get)
    }

    thread_local! {
        static OPENAT2_HITS: Cell<u64> = const { Cell::new(0) };
    }

    /// Counts the directories this thread opened with one `openat2` call.
    pub(crate) fn note_openat2() {
        OPENAT2_HITS.with(|n| n.set(n.get() + 1));
    }

    pub(crate) fn openat2_hits() -> u64 {
        OPENAT2_HITS.with(Cell::get)
    }
}

#[cfg(test)]
pub(crate) use walk_switch::{force_walk, note_openat2, openat2_hits, walk_forced};

/// Outside the crate's tests the resolver is never forced.
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn walk_forced() -> bool {
    false
}

#[cfg(not(test))]
#[inline(always)]
pub(crate) fn note_openat2() {}
