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
//! The line in front of them is bounded by the time a login would wait in
//! it, not by its length: a login is turned away (`Busy`) only when it
//! could not start its check within `max_wait` (`--login-max-wait`, 3 s by
//! default). Each arrival's wait is foreseen from the checks ahead of it and
//! the time a check takes lately (a moving average of the checks run), so
//! that one that would wait too long is told so at once; and a check that
//! reaches a thread later than `max_wait` after it was admitted (the
//! forecast was short) is not run either. A browser form does not retry a
//! 503: a burst of logins that the threads clear within seconds all get in.
//! Waiting logins hold no hash memory; only the running checks do. A hard
//! cap on the logins in line (`--login-queue`) bounds what a flood parks.
//!
//! And the threads run at a lower CPU priority than the rest of the
//! process ([`CHECK_NICENESS`]): in a login flood, hashing takes the CPU
//! that forward-auth leaves, so the verify answers every application waits
//! on keep their pace while logins slow down.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// A check in line: `go(true)` runs it, `go(false)` turns it away unrun.
struct Job {
    /// When it was admitted; `None`: never turned away (a calibration).
    admitted: Option<Instant>,
    go: Box<dyn FnOnce(bool) + Send + 'static>,
}

/// The checks waiting for a thread, first come first served.
#[derive(Default)]
struct Line {
    state: Mutex<LineState>,
    ready: Condvar,
}

#[derive(Default)]
struct LineState {
    jobs: VecDeque<Job>,
    /// The pool was dropped: the threads end once the line is empty.
    closed: bool,
}

impl Line {
    fn push(&self, job: Job) -> Result<(), PoolError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.closed {
            return Err(PoolError::Failed);
        }
        st.jobs.push_back(job);
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// The next check for a thread, and those at the back of the line that
    /// can no longer start in time (turned away now, not when their turn
    /// comes): the `i`-th still waiting starts after about `i / threads + 1`
    /// checks of `check` each. `None`: the pool is gone.
    fn next(&self, threads: usize, check: Duration, max_wait: Duration) -> Option<(Job, Vec<Job>)> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(job) = st.jobs.pop_front() {
                let mut hopeless = Vec::new();
                if !check.is_zero() {
                    let now = Instant::now();
                    while let Some(last) = st.jobs.back() {
                        let i = st.jobs.len() - 1;
                        let rounds = u32::try_from(i / threads + 1).unwrap_or(u32::MAX);
                        let starts = now + check.saturating_mul(rounds);
                        match last.admitted {
                            Some(at) if at + max_wait < starts => {
                                hopeless.extend(st.jobs.pop_back());
                            }
                            _ => break,
                        }
                    }
                }
                return Some((job, hopeless));
            }
            if st.closed {
                return None;
            }
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.ready.notify_all();
    }
}

/// How much nicer than the rest of the process the check threads are
/// (`nice` +10, capped at the lowest priority, 19).
pub const CHECK_NICENESS: i32 = 10;

/// The longest a login waits for its check to start, by default.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(3);

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
    /// The check could not start in time: `wait` is how long the line
    /// would hold it now (when to come back).
    Busy { wait: Duration },
    /// The check could not run (the pool is shutting down, or it panicked).
    Failed,
}

/// What the line holds, for the forecast.
#[derive(Debug, Default)]
struct Load {
    /// Admitted, not started.
    waiting: AtomicUsize,
    /// On a thread now.
    running: AtomicUsize,
    /// A check's duration lately (µs; a moving average, 1/8 per check); 0
    /// until a first check has run.
    check_us: AtomicU64,
}

impl Load {
    fn ran(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        // A lost update between two threads only delays the average by one
        // sample: not worth a lock.
        let old = self.check_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { old - old / 8 + us / 8 };
        self.check_us.store(new.max(1), Ordering::Relaxed);
    }
}

pub struct HashPool {
    line: Arc<Line>,
    threads: usize,
    max_wait: Duration,
    load: Arc<Load>,
    /// Places for running + waiting checks: `threads + queue`.
    places: Arc<Semaphore>,
}

impl HashPool {
    /// `threads` checks at once (at least 1); at most `queue` more waiting,
    /// and none that would wait longer than `max_wait`.
    pub fn new(threads: usize, queue: usize, max_wait: Duration) -> HashPool {
        let threads = threads.max(1);
        let line = Arc::new(Line::default());
        let load: Arc<Load> = Arc::default();
        for i in 0..threads {
            let (line, load) = (line.clone(), load.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("password-check-{i}"))
                .spawn(move || {
                    run_below_the_rest();
                    loop {
                        let check = Duration::from_micros(load.check_us.load(Ordering::Relaxed));
                        let Some((job, hopeless)) = line.next(threads, check, max_wait) else {
                            return;
                        };
                        for h in hopeless {
                            (h.go)(false);
                        }
                        (job.go)(true);
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-check thread");
            }
        }
        HashPool {
            line,
            threads,
            max_wait,
            load,
            places: Arc::new(Semaphore::new(threads + queue)),
        }
    }

    /// One thread per core the process may use, at most 4: checks are
    /// CPU-bound, so more threads add memory, not throughput.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4))
    }

    /// At most 256 logins in line per thread: the wait decides first (at
    /// the default costs, a few dozen per thread fit in 3 s); this only
    /// bounds what a flood of cheap checks parks.
    pub fn default_queue(threads: usize) -> usize {
        threads.max(1) * 256
    }

    /// How long a login arriving now would wait for a thread: the rounds of
    /// checks ahead of it times a check's recent duration (none known yet:
    /// no wait foreseen; the start deadline still holds).
    pub fn expected_wait(&self) -> Duration {
        let ahead =
            self.load.waiting.load(Ordering::Relaxed) + self.load.running.load(Ordering::Relaxed);
        if ahead < self.threads {
            return Duration::ZERO;
        }
        let rounds = (ahead + 1 - self.threads).div_ceil(self.threads);
        let check = Duration::from_micros(self.load.check_us.load(Ordering::Relaxed));
        check.saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX))
    }

    /// A place in the line, or `Busy` at once when the login would wait
    /// longer than the pool's `max_wait` (or the line is at its cap). Taken
    /// before anything else a login does, so that a login turned away costs
    /// nothing more (no store round trip).
    pub fn admit(&self) -> Result<Place, PoolError> {
        let wait = self.expected_wait();
        if wait > self.max_wait {
            return Err(PoolError::Busy { wait });
        }
        let permit = self
            .places
            .clone()
            .try_acquire_owned()
            .map_err(|_| PoolError::Busy {
                wait: wait.max(Duration::from_secs(1)),
            })?;
        self.load.waiting.fetch_add(1, Ordering::Relaxed);
        Ok(Place {
            _permit: permit,
            load: self.load.clone(),
            admitted: Instant::now(),
            started: false,
        })
    }

    /// Runs `f` (a check like the logins' own) once on a pool thread,
    /// outside the line, so that the first burst of logins is forecast from
    /// what a check costs here and not admitted blind.
    pub async fn calibrate<F>(&self, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let load = self.load.clone();
        let go = Box::new(move |_: bool| {
            let began = Instant::now();
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok() {
                load.ran(began.elapsed());
            }
            let _ = tx.send(());
        });
        if self.line.push(Job { admitted: None, go }).is_ok() {
            let _ = rx.await;
        }
    }

    /// Runs `f` on a pool thread, or answers `Busy` when it could not start
    /// in time. The place in line is held until `f` has finished, even if
    /// the caller stops waiting.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let place = self.admit()?;
        self.run_in(place, f).await
    }

    /// Runs `f` on a pool thread in the place taken by [`HashPool::admit`];
    /// `Busy` if it could not start within `max_wait` of its admission (told
    /// as soon as the line foresees it, or when its turn comes too late).
    pub async fn run_in<T, F>(&self, place: Place, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let max_wait = self.max_wait;
        let admitted = place.admitted;
        let go = Box::new(move |run: bool| {
            let mut place = place;
            // The caller has gone (client disconnected): skip the work.
            if tx.is_closed() {
                return;
            }
            // The place is given back before the answer goes out, so that
            // whoever reads the answer sees the line without it.
            if !run || place.admitted.elapsed() > max_wait {
                let wait = Duration::from_micros(place.load.check_us.load(Ordering::Relaxed));
                drop(place);
                let _ = tx.send(Err(PoolError::Busy { wait }));
                return;
            }
            place.start();
            let began = Instant::now();
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            place.load.ran(began.elapsed());
            drop(place);
            if let Ok(v) = ran {
                let _ = tx.send(Ok(v));
            }
        });
        self.line.push(Job {
            admitted: Some(admitted),
            go,
        })?;
        rx.await.map_err(|_| PoolError::Failed)?
    }
}

impl Drop for HashPool {
    fn drop(&mut self) {
        self.line.close();
    }
}

/// A place in the pool's line (running or waiting), given back when dropped.
pub struct Place {
    _permit: OwnedSemaphorePermit,
    load: Arc<Load>,
    admitted: Instant,
    started: bool,
}

impl Place {
    fn start(&mut self) {
        self.started = true;
        self.load.running.fetch_add(1, Ordering::Relaxed);
        self.load.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let held = if self.started {
            &self.load.running
        } else {
            &self.load.waiting
        };
        held.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A deadline no test reaches.
    const LONG: Duration = Duration::from_secs(600);

    /// Sends `n` jobs at once, each sleeping `each`; answers (ran, busy,
    /// the longest time a refusal took to come back).
    async fn burst(pool: &Arc<HashPool>, n: usize, each: Duration) -> (usize, usize, Duration) {
        let ran = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (pool, ran) = (pool.clone(), ran.clone());
            tasks.push(tokio::spawn(async move {
                let sent = std::time::Instant::now();
                let r = pool
                    .run(move || {
                        ran.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(each);
                    })
                    .await;
                (r, sent.elapsed())
            }));
        }
        let (mut done, mut busy, mut slowest_refusal) = (0, 0, Duration::ZERO);
        for t in tasks {
            match t.await.unwrap() {
                (Ok(()), _) => done += 1,
                (Err(PoolError::Busy { wait }), took) => {
                    assert!(wait > Duration::ZERO, "a refusal says when to come back");
                    busy += 1;
                    slowest_refusal = slowest_refusal.max(took);
                }
                (Err(e), _) => panic!("{e:?}"),
            }
        }
        assert_eq!(
            ran.load(Ordering::SeqCst),
            done,
            "a refused check never runs"
        );
        (done, busy, slowest_refusal)
    }

    #[tokio::test]
    async fn a_burst_is_admitted_as_far_as_the_deadline_allows_and_the_rest_refused_at_once() {
        // One thread, a line long enough for anything, 100 ms checks and a
        // 650 ms deadline: the forecast (once a check's cost is known) lets
        // in what starts within 650 ms, 1 running + 6 waiting (one fewer
        // when the machine's delays push the last past the deadline: the
        // line then turns it away as soon as it foresees it).
        let each = Duration::from_millis(100);
        let deadline = Duration::from_millis(650);
        let pool = Arc::new(HashPool::new(1, 1_000, deadline));
        pool.calibrate(move || std::thread::sleep(each)).await;
        assert_eq!(pool.expected_wait(), Duration::ZERO, "an empty line");
        let (done, busy, slowest_refusal) = burst(&pool, 40, each).await;
        assert!((5..=8).contains(&done), "ran {done}, refused {busy}");
        assert_eq!(done + busy, 40);
        // Refused on arrival, not after waiting out the deadline.
        assert!(slowest_refusal < deadline, "{slowest_refusal:?}");
        // The line is empty again, and takes a login at once.
        assert_eq!(pool.expected_wait(), Duration::ZERO);
        assert_eq!(pool.run(|| 7).await, Ok(7));
    }

    #[tokio::test]
    async fn a_check_that_cannot_start_before_the_deadline_is_refused_not_run() {
        // No check's cost known yet (no calibration): the first burst is
        // let in blind, and the deadline at the start of each check is what
        // refuses: 60 ms checks, 100 ms deadline, one thread: the first
        // starts at 0, the second at ~60 ms, the third would at ~120 ms.
        let pool = Arc::new(HashPool::new(1, 1_000, Duration::from_millis(100)));
        let (done, busy, _) = burst(&pool, 5, Duration::from_millis(60)).await;
        assert_eq!((done, busy), (2, 3));
        assert_eq!(
            pool.expected_wait(),
            Duration::ZERO,
            "nothing left counted in line"
        );
    }

    #[tokio::test]
    async fn checks_that_the_line_foresees_missing_the_deadline_are_refused_early() {
        // Let in blind (no cost known), 60 ms checks, 250 ms deadline, one
        // thread: once the first check has run, the line knows that the
        // sixth onwards cannot start by 250 ms, and says so then, not when
        // their deadline has passed.
        let deadline = Duration::from_millis(250);
        let pool = Arc::new(HashPool::new(1, 1_000, deadline));
        let (done, busy, slowest_refusal) = burst(&pool, 10, Duration::from_millis(60)).await;
        assert!((4..=5).contains(&done), "ran {done}, refused {busy}");
        assert!(slowest_refusal < deadline, "{slowest_refusal:?}");
    }

    #[tokio::test]
    async fn the_forecast_counts_the_rounds_of_checks_ahead() {
        let pool = HashPool::new(2, 100, LONG);
        pool.calibrate(|| std::thread::sleep(Duration::from_millis(20)))
            .await;
        let check = pool.expected_wait();
        assert_eq!(check, Duration::ZERO);
        // Two places taken (the two threads' worth): the next waits one
        // check; four taken: two checks.
        let places: Vec<Place> = (0..2).map(|_| pool.admit().unwrap()).collect();
        let one = pool.expected_wait();
        assert!(
            one >= Duration::from_millis(20) && one < Duration::from_millis(200),
            "{one:?}"
        );
        let more: Vec<Place> = (0..2).map(|_| pool.admit().unwrap()).collect();
        assert_eq!(pool.expected_wait(), one * 2);
        let one_more = pool.admit().unwrap();
        assert_eq!(
            pool.expected_wait(),
            one * 2,
            "5 ahead on 2 threads: still 2 rounds"
        );
        drop((places, more, one_more));
        assert_eq!(pool.expected_wait(), Duration::ZERO, "places given back");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn checks_run_below_the_priority_of_the_rest() {
        use rustix::process::getpriority_process;
        let mine = || getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let outside = mine();
        let pool = HashPool::new(1, 1, LONG);
        let inside = pool.run(mine).await.unwrap();
        assert_eq!(inside, (outside + CHECK_NICENESS).min(19));
        assert_eq!(mine(), outside, "only the check threads are lowered");
    }

    #[tokio::test]
    async fn runs_on_at_most_n_threads_and_refuses_past_the_queue() {
        let pool = Arc::new(HashPool::new(2, 3, LONG));
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
                Err(PoolError::Busy { .. }) => busy += 1,
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
    async fn the_defaults_are_one_thread_per_core_up_to_4_and_256_in_line_per_thread() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert_eq!(HashPool::default_threads(), cores.clamp(1, 4));
        assert_eq!(HashPool::default_queue(3), 768);
        assert_eq!(
            HashPool::default_queue(0),
            256,
            "a pool has at least one thread"
        );
        // Asked for no thread, a pool still runs checks, on one.
        assert_eq!(HashPool::new(0, 0, LONG).run(|| 1).await, Ok(1));
    }

    #[tokio::test]
    async fn a_panicking_check_fails_without_killing_the_pool() {
        let pool = HashPool::new(1, 0, LONG);
        let r: Result<(), _> = pool.run(|| panic!("boom")).await;
        assert_eq!(r, Err(PoolError::Failed));
        assert_eq!(pool.run(|| 1).await, Ok(1));
    }
}
