//! Wake-ups on the delivery path, kept cheap.
//!
//! A connection runs as one task with two halves, a reader and a writer. Each delivery to an
//! idle connection wakes that task once, so the wake-up should touch as little memory as
//! possible: the hub has just written the connection's outbox, and [`Halves`] lives next to it
//! in the [`ClientHandle`]. Setting the writer's bit there and waking the task is the whole
//! wake-up: no lock, no waiter list, no separate allocation, and only the woken half is polled
//! (`tokio::join!` polls both on every wake-up, so each delivery would also poll the reader's
//! socket, timers and shutdown token).

use crate::client::ClientHandle;
use futures_util::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};

const READER: u8 = 1;
const WRITER: u8 = 2;

/// Which halves of a connection's task were woken, the task's waker, and the halves' own
/// notifications.
#[derive(Debug, Default)]
pub(crate) struct Halves {
    woken: AtomicU8,
    task: AtomicWaker,
    /// The writer has something to do (messages, close, timers).
    writer_pending: AtomicBool,
    /// The reader has something to do (control message, close).
    reader_pending: AtomicBool,
}

impl Halves {
    fn wake(&self, bits: u8) {
        self.woken.fetch_or(bits, Ordering::AcqRel);
        self.task.wake();
    }

    /// Notifies the writer. A notification sent while the writer is busy is kept for its next
    /// wait.
    pub(crate) fn notify_writer(&self) {
        if !self.writer_pending.swap(true, Ordering::AcqRel) {
            self.wake(WRITER);
        }
    }

    /// Notifies the reader, like [`Halves::notify_writer`].
    pub(crate) fn notify_reader(&self) {
        if !self.reader_pending.swap(true, Ordering::AcqRel) {
            self.wake(READER);
        }
    }

    /// Waits for a writer notification. Only for the writer half run by [`run_halves`]: the
    /// notification wakes the task through its bit, not through this future's waker. Cancel-safe.
    pub(crate) async fn writer_notified(&self) {
        std::future::poll_fn(|_| take(&self.writer_pending)).await;
    }

    /// Waits for a reader notification; see [`Halves::writer_notified`].
    pub(crate) async fn reader_notified(&self) {
        std::future::poll_fn(|_| take(&self.reader_pending)).await;
    }
}

fn take(flag: &AtomicBool) -> Poll<()> {
    if flag.swap(false, Ordering::AcqRel) {
        Poll::Ready(())
    } else {
        Poll::Pending
    }
}

/// The writer half's waker (socket writable, timer) is the client handle itself.
impl Wake for ClientHandle {
    fn wake(self: Arc<Self>) {
        self.halves.wake(WRITER);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.halves.wake(WRITER);
    }
}

/// The reader half's waker (socket readable, timer, shutdown).
struct ReaderWaker(Arc<ClientHandle>);

impl Wake for ReaderWaker {
    fn wake(self: Arc<Self>) {
        self.0.halves.wake(READER);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.halves.wake(READER);
    }
}

/// Runs a connection's reader and writer in the calling task until both finish, polling each
/// only after its own wake-up.
pub(crate) async fn run_halves<R, W>(
    client: &Arc<ClientHandle>,
    mut reader: Pin<&mut R>,
    mut writer: Pin<&mut W>,
) where
    R: Future<Output = ()>,
    W: Future<Output = ()>,
{
    let halves = &client.halves;
    let reader_waker = Waker::from(Arc::new(ReaderWaker(client.clone())));
    let writer_waker = Waker::from(client.clone());
    // Both are polled first.
    halves.woken.store(READER | WRITER, Ordering::Release);
    let mut done = 0u8;
    std::future::poll_fn(|cx| {
        // Registered before the bits are taken, so a wake-up during the polls is not lost.
        halves.task.register(cx.waker());
        let woken = halves.woken.swap(0, Ordering::AcqRel) & !done;
        if woken & WRITER != 0 && poll_half(&mut writer, &writer_waker) {
            done |= WRITER;
        }
        if woken & READER != 0 && poll_half(&mut reader, &reader_waker) {
            done |= READER;
        }
        if done == READER | WRITER {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// Polls one half with its own waker; true when it finished.
fn poll_half<F: Future<Output = ()>>(half: &mut Pin<&mut F>, waker: &Waker) -> bool {
    half.as_mut()
        .poll(&mut Context::from_waker(waker))
        .is_ready()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use holdfast_protocol::Encoding;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn client() -> Arc<ClientHandle> {
        ClientHandle::new("c".into(), 1, Encoding::Json, false, 1 << 20)
    }

    /// A half that counts its polls and finishes on its first notification.
    async fn counted(polls: &AtomicUsize, wait: impl Future<Output = ()>) {
        let mut wait = pin!(wait);
        std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            wait.as_mut().poll(cx)
        })
        .await;
    }

    async fn until(cond: impl Fn() -> bool) {
        while !cond() {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn only_the_notified_half_is_polled() {
        let c = client();
        let (pr, pw) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let task = tokio::spawn({
            let (c, pr, pw) = (c.clone(), pr.clone(), pw.clone());
            async move {
                run_halves(
                    &c,
                    pin!(counted(&pr, c.halves.reader_notified())),
                    pin!(counted(&pw, c.halves.writer_notified())),
                )
                .await;
            }
        });
        until(|| pr.load(Ordering::Relaxed) == 1 && pw.load(Ordering::Relaxed) == 1).await;
        c.halves.notify_writer();
        until(|| pw.load(Ordering::Relaxed) == 2).await;
        assert_eq!(
            pr.load(Ordering::Relaxed),
            1,
            "waking the writer does not poll the reader"
        );
        assert!(!task.is_finished(), "the reader still waits");
        c.halves.notify_reader();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            pw.load(Ordering::Relaxed),
            2,
            "the finished writer is not polled again"
        );
    }

    #[tokio::test]
    async fn a_notification_while_busy_is_kept() {
        let c = client();
        c.halves.notify_writer();
        c.halves.notify_writer();
        let pw = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (c, pw) = (c.clone(), pw.clone());
            async move {
                let writer = async {
                    c.halves.writer_notified().await; // the pending one
                    c.halves.writer_notified().await; // needs a new one
                };
                run_halves(&c, pin!(async {}), pin!(counted(&pw, writer))).await;
            }
        });
        until(|| pw.load(Ordering::Relaxed) == 1).await;
        assert!(
            !task.is_finished(),
            "two notifications before a wait are one"
        );
        c.halves.notify_writer();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn the_halves_own_wakers_reach_them() {
        // A timer in the writer half wakes it through the writer waker (the client handle).
        let c = client();
        tokio::time::timeout(
            Duration::from_secs(5),
            run_halves(
                &c,
                pin!(tokio::time::sleep(Duration::from_millis(5))),
                pin!(tokio::time::sleep(Duration::from_millis(10))),
            ),
        )
        .await
        .unwrap();
    }
}
