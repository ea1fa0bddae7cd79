//! Thread-per-core data plane, like Envoy's workers: each worker thread runs its own
//! current-thread runtime with its own import listeners (one `SO_REUSEPORT` socket each, so
//! the kernel spreads callers' connections), its own tunnel endpoint and connections, and
//! its own idle upstream connections. A request is accepted, routed over a tunnel, answered
//! by the peer's worker and forwarded upstream without leaving one thread on either node,
//! so no request pays for a cross-thread wake-up (a futex call and an inter-processor
//! interrupt, 2–4 per request per node with a work-stealing runtime).
//!
//! The control plane (admin API, ACL commits, health checks, signals, reload) stays on the
//! main thread's runtime, so an fsync of the policy store never stalls a request.
//!
//! [`Workers::inline`] is the one-thread form: everything runs on the caller's runtime
//! (`--worker-threads 1`, in-process tests).

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Number of the worker running the calling thread: 1 to N on worker threads, 0 on the
/// main thread and any other. Links and pooled connections are tagged with it, so a
/// worker uses its own first, and the control plane's health checks keep theirs apart.
pub(crate) fn current() -> usize {
    INDEX.with(Cell::get)
}

/// Highest worker number started in this process: per-worker tables ([`PerWorker`]) have a
/// slot for each number up to it, plus one for the main thread.
static HIGHEST: AtomicUsize = AtomicUsize::new(0);

/// One `T` for each worker and one for the main thread, each on its own cache line: what a
/// worker's requests update is touched by no other thread until it is read (summed, at
/// scrape time). A table has a slot for each worker started before it was made, and at least
/// one per CPU (the default number of workers); a worker numbered past it shares a slot,
/// which callers must allow for (correct, only not private).
pub(crate) struct PerWorker<T> {
    slots: Box<[Padded<T>]>,
}

/// A cache line of its own, so two workers' slots never share one.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

impl<T: Default> Default for PerWorker<T> {
    fn default() -> Self {
        Self {
            slots: (0..=HIGHEST.load(Ordering::Relaxed).max(cpus()))
                .map(|_| Padded::default())
                .collect(),
        }
    }
}

/// CPUs this process may run on: the default number of workers.
pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

impl<T> PerWorker<T> {
    /// The calling worker's slot (the main thread's off the workers).
    pub(crate) fn current(&self) -> &T {
        self.get(current())
    }

    /// Worker `worker`'s slot.
    pub(crate) fn get(&self, worker: usize) -> &T {
        &self.slots[worker % self.slots.len()].0
    }

    /// Every slot, to sum or to clear.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().map(|slot| &slot.0)
    }
}

/// The long-lived connections each worker holds, so that one any worker accepted can be
/// served by the worker holding the fewest (Envoy's exact connection balance). The kernel's
/// `SO_REUSEPORT` hash picks the accepting worker from the peer's address alone: with a
/// handful of tunnels, which carry every request, it put both tunnels of a peer with two on
/// one worker half of the time, and that worker then ran the whole node's load while the
/// other idled.
pub(crate) struct Balance {
    held: Box<[AtomicUsize]>,
}

/// A connection counted on worker `worker` (from 0) until dropped.
pub(crate) struct Held {
    balance: Arc<Balance>,
    worker: usize,
}

impl Balance {
    pub(crate) fn new(workers: usize) -> Arc<Self> {
        Arc::new(Self {
            held: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
        })
    }

    /// Counts a new connection on the worker holding the fewest; `accepting` (the worker
    /// that accepted it, from 0) among equals, so a tie never moves a connection. Two
    /// workers choosing at once may both pick the same one: the balance is kept, not exact.
    pub(crate) fn take(self: &Arc<Self>, accepting: usize) -> Held {
        let load = |worker: usize| self.held[worker].load(Ordering::Relaxed);
        let accepting = accepting.min(self.held.len() - 1);
        let worker = (0..self.held.len())
            .min_by_key(|&w| (load(w), w != accepting))
            .unwrap_or(accepting);
        self.held[worker].fetch_add(1, Ordering::Relaxed);
        Held {
            balance: self.clone(),
            worker,
        }
    }
}

impl Held {
    /// The worker (from 0) the connection is counted on.
    pub(crate) fn worker(&self) -> usize {
        self.worker
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.balance.held[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

/// The runtimes a node spreads its data plane over.
pub struct Workers {
    /// One handle per worker; `None` is the caller's own runtime.
    handles: Vec<Option<Handle>>,
    stop: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Workers {
    /// No worker threads: the node runs on the runtime that starts it.
    pub(crate) fn inline() -> Self {
        Self {
            handles: vec![None],
            stop: CancellationToken::new(),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// Starts `count` worker threads, each with a current-thread runtime.
    pub fn spawn(count: usize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        HIGHEST.fetch_max(count.max(1), Ordering::Relaxed);
        let mut handles = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(Some(runtime.handle().clone()));
            let stop = stop.clone();
            let number = index + 1;
            let thread = std::thread::Builder::new()
                .name(format!("hybridge-w{number}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(number));
                    runtime.block_on(stop.cancelled());
                })?;
            threads.push(thread);
        }
        Ok(Self {
            handles,
            stop,
            threads: Mutex::new(threads),
        })
    }

    pub(crate) fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `f` with the `index`th worker's (from 0) runtime as the current one, so sockets
    /// it creates register with that worker's reactor.
    pub(crate) fn enter<T>(&self, index: usize, f: impl FnOnce() -> T) -> T {
        match &self.handles[index] {
            Some(handle) => {
                let _guard = handle.enter();
                f()
            }
            None => f(),
        }
    }

    /// Spawns `task` on the `index`th worker (from 0), tracked by `tracker`.
    pub(crate) fn spawn_on<F>(&self, index: usize, tracker: &TaskTracker, task: F)
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.handles[index] {
            Some(handle) => drop(tracker.spawn_on(task, handle)),
            None => drop(tracker.spawn(task)),
        }
    }

    /// Stops the worker threads once the node on them has shut down; tasks still on them
    /// are dropped.
    pub fn stop(&self) {
        self.stop.cancel();
        let threads = match self.threads.lock() {
            Ok(mut threads) => std::mem::take(&mut *threads),
            Err(_) => return,
        };
        for thread in threads {
            // The last owner may be a task on a worker; a thread cannot join itself.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_to_the_worker_holding_the_fewest_and_leaves_with_its_count() {
        let balance = Balance::new(3);
        // A tie keeps the connection on the worker that accepted it.
        let a = balance.take(1);
        assert_eq!(a.worker(), 1);
        // Worker 1 holds one: the next two go to the idle workers, whoever accepted them.
        let b = balance.take(1);
        let c = balance.take(1);
        assert_eq!([b.worker(), c.worker()], [0, 2]);
        let d = balance.take(2);
        assert_eq!(d.worker(), 2);
        // Worker 1's connection ends: it now holds the fewest.
        drop(a);
        assert_eq!(balance.take(0).worker(), 1);
        // Out-of-range numbers (more listeners than counted workers) count on the last.
        assert_eq!(Balance::new(1).take(5).worker(), 0);
    }

    #[test]
    fn each_worker_knows_its_index_and_runs_its_own_tasks() {
        let workers = Workers::spawn(3).unwrap();
        assert_eq!(workers.count(), 3);
        let tracker = TaskTracker::new();
        let (tx, rx) = std::sync::mpsc::channel();
        for index in 0..3 {
            let tx = tx.clone();
            workers.spawn_on(index, &tracker, async move {
                let name = std::thread::current().name().map(str::to_owned);
                tx.send((index, current(), name)).unwrap();
            });
        }
        drop(tx);
        let mut seen: Vec<_> = rx.iter().collect();
        seen.sort();
        assert_eq!(
            seen,
            (0..3)
                .map(|i| (i, i + 1, Some(format!("hybridge-w{}", i + 1))))
                .collect::<Vec<_>>()
        );
        workers.stop();
    }

    #[test]
    fn inline_workers_run_on_the_callers_runtime() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let workers = Workers::inline();
        let caller = std::thread::current().id();
        let ran_on = runtime.block_on(async {
            let tracker = TaskTracker::new();
            let (tx, rx) = tokio::sync::oneshot::channel();
            workers.spawn_on(0, &tracker, async move {
                let _ = tx.send((std::thread::current().id(), current()));
            });
            rx.await.unwrap()
        });
        assert_eq!(ran_on, (caller, 0));
    }
}
