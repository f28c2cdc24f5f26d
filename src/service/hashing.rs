//! Password checks run on a small, fixed set of threads of their own, behind
//! a bounded waiting line.
//!
//! Why not `spawn_blocking`: each argon2id check allocates its memory cost
//! (19 MiB with the defaults). On Tokio's blocking pool (up to 512 threads)
//! the checks of a login burst land on ever new threads, glibc gives them
//! separate malloc arenas, and each arena keeps the freed 19 MiB for reuse:
//! 40 concurrent logins left the process at ~450 MiB. A fixed set of
//! `threads` threads keeps at most `threads` such blocks alive, so peak
//! memory is about `threads` x the largest argon2 memory cost in the users
//! file, during a burst and after it.
//!
//! The line in front of them is bounded too (`queue` waiting checks): a
//! login that finds it full is refused at once (`Busy`), never parked in an
//! unbounded pile.
//!
//! And the threads run at a lower CPU priority than the rest of the
//! process ([`CHECK_NICENESS`]): in a login flood, hashing takes the CPU
//! that forward-auth leaves, so the verify answers every application waits
//! on keep their pace while logins slow down.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How much nicer than the rest of the process the check threads are
/// (`nice` +10, capped at the lowest priority, 19).
pub const CHECK_NICENESS: i32 = 10;

/// Lowers the calling thread's CPU priority by [`CHECK_NICENESS`]. On Linux
/// a priority is per thread; lowering one's own needs no privilege.
fn run_below_the_rest() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let me = Some(rustix::thread::gettid());
        let lower = (getpriority_process(me).unwrap_or(0) + CHECK_NICENESS).min(19);
        if let Err(e) = setpriority_process(me, lower) {
            tracing::warn!(error = %e, "cannot lower the priority of a password-check thread");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolError {
    /// Every thread is busy and the waiting line is full.
    Busy,
    /// The check could not run (the pool is shutting down, or it panicked).
    Failed,
}

pub struct HashPool {
    jobs: mpsc::Sender<Job>,
    /// Permits for running + waiting checks: `threads + queue`.
    admission: Arc<Semaphore>,
}

impl HashPool {
    /// `threads` checks at once (at least 1), and at most `queue` more waiting.
    pub fn new(threads: usize, queue: usize) -> HashPool {
        let threads = threads.max(1);
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("password-check-{i}"))
                .spawn(move || {
                    run_below_the_rest();
                    loop {
                        // Held only while waiting for the next job.
                        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match next {
                            Ok(job) => job(),
                            // The pool was dropped.
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-check thread");
            }
        }
        HashPool {
            jobs,
            admission: Arc::new(Semaphore::new(threads + queue)),
        }
    }

    /// One thread per core the process may use, at most 4: checks are
    /// CPU-bound, so more threads add memory, not throughput.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4))
    }

    /// Eight waiting checks per thread: a few hundred ms of work at the
    /// default costs.
    pub fn default_queue(threads: usize) -> usize {
        threads.max(1) * 8
    }

    /// A place in the line, or `Busy` at once when it is full. Taken
    /// before anything else a login does, so that a login turned away costs
    /// nothing more (no store round trip).
    pub fn admit(&self) -> Result<Place, PoolError> {
        self.admission
            .clone()
            .try_acquire_owned()
            .map(|permit| Place { _permit: permit })
            .map_err(|_| PoolError::Busy)
    }

    /// Runs `f` on a pool thread, or answers `Busy` at once when the
    /// waiting line is full. The place in line is held until `f` has
    /// finished, even if the caller stops waiting.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let place = self.admit()?;
        self.run_in(place, f).await
    }

    /// Runs `f` on a pool thread in the place taken by [`HashPool::admit`].
    pub async fn run_in<T, F>(&self, place: Place, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _place = place;
            // The caller has gone (client disconnected): skip the work.
            if tx.is_closed() {
                return;
            }
            if let Ok(v) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                let _ = tx.send(v);
            }
        });
        self.jobs.send(job).map_err(|_| PoolError::Failed)?;
        rx.await.map_err(|_| PoolError::Failed)
    }
}

/// A place in the pool's line (running or waiting), given back when dropped.
pub struct Place {
    _permit: OwnedSemaphorePermit,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn checks_run_below_the_priority_of_the_rest() {
        use rustix::process::getpriority_process;
        let mine = || getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let outside = mine();
        let pool = HashPool::new(1, 1);
        let inside = pool.run(mine).await.unwrap();
        assert_eq!(inside, (outside + CHECK_NICENESS).min(19));
        assert_eq!(mine(), outside, "only the check threads are lowered");
    }

    #[tokio::test]
    async fn runs_on_at_most_n_threads_and_refuses_past_the_queue() {
        let pool = Arc::new(HashPool::new(2, 3));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                pool.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(50));
                    running.fetch_sub(1, Ordering::SeqCst);
                    std::thread::current().name().map(str::to_string)
                })
                .await
            }));
        }
        let mut done = 0;
        let mut busy = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(name) => {
                    assert!(name.unwrap().starts_with("password-check-"));
                    done += 1;
                }
                Err(PoolError::Busy) => busy += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        // 2 running + 3 waiting admitted; the other 15 refused at once.
        assert_eq!((done, busy), (5, 15));
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        // The line is free again afterwards.
        assert_eq!(pool.run(|| 7).await, Ok(7));
    }

    #[tokio::test]
    async fn the_defaults_are_one_thread_per_core_up_to_4_and_8_waiting_per_thread() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert_eq!(HashPool::default_threads(), cores.clamp(1, 4));
        assert_eq!(HashPool::default_queue(3), 24);
        assert_eq!(
            HashPool::default_queue(0),
            8,
            "a pool has at least one thread"
        );
        // Asked for no thread, a pool still runs checks, on one.
        assert_eq!(HashPool::new(0, 0).run(|| 1).await, Ok(1));
    }

    #[tokio::test]
    async fn a_panicking_check_fails_without_killing_the_pool() {
        let pool = HashPool::new(1, 0);
        let r: Result<(), _> = pool.run(|| panic!("boom")).await;
        assert_eq!(r, Err(PoolError::Failed));
        assert_eq!(pool.run(|| 1).await, Ok(1));
    }
}
