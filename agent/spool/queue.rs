//! The spool thread's command queue: any number of senders (the runtime's tasks, each through
//! a clone of `SpoolHandle`), one receiver (the spool thread).
//!
//! It is the spool's own, not a channel crate's, for the two things the spool's wakeups need.
//! The receiver parks at once on an empty queue: a channel that spins and yields first (as
//! crossbeam-channel's does) made the spool thread call `sched_yield` about 1,600 times a
//! second at 1,000 msg/s. And a sender wakes the receiver only when it waits for that kind
//! of command: while the spool gathers a group until a deadline ([`Receiver::wait_until`]),
//! appends sent with [`Sender::send_quiet`] wait for it to take them at the deadline instead
//! of waking it for each one, while a command sent with [`Sender::send`] (one that needs an
//! answer or ends the gathering) wakes it at once.
//!
//! It must never lose a command accepted while the receiver lives, and never hold a sender
//! longer than one push under the lock (senders are async tasks).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// A new queue: its first sender and its receiver.
pub(crate) fn queue<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            urgent: false,
            senders: 1,
            receiver: true,
            parked: None,
        }),
        wake: Condvar::new(),
    });
    (
        Sender(shared.clone()),
        Receiver {
            shared,
            taken: VecDeque::new(),
        },
    )
}

struct Shared<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
}

struct State<T> {
    items: VecDeque<T>,
    /// An item sent with [`Sender::send`] is among `items`.
    urgent: bool,
    senders: usize,
    /// The receiver is alive.
    receiver: bool,
    /// What wakes the parked receiver (`None`: it is not parked, or a sender woke it already).
    parked: Option<Waits>,
}

/// What the parked receiver waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waits {
    /// Any item.
    Any,
    /// An item sent with [`Sender::send`] (or its deadline).
    Urgent,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic under the lock leaves the queue itself consistent (every change is one
        // step), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The receiver is gone; the item comes back.
pub(crate) struct Closed<T>(pub(crate) T);

impl<T> std::fmt::Debug for Closed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the receiver is gone")
    }
}

/// Why a wait returned no item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Empty {
    /// The deadline passed.
    Timeout,
    /// Every sender is gone and nothing is left.
    Disconnected,
}

pub(crate) struct Sender<T>(Arc<Shared<T>>);

impl<T> Sender<T> {
    /// Queues `item` and wakes the receiver if it is parked.
    pub(crate) fn send(&self, item: T) -> Result<(), Closed<T>> {
        self.push(item, true)
    }

    /// Queues `item`, waking the receiver only if it waits for any item (not while it
    /// gathers until a deadline).
    pub(crate) fn send_quiet(&self, item: T) -> Result<(), Closed<T>> {
        self.push(item, false)
    }

    fn push(&self, item: T, urgent: bool) -> Result<(), Closed<T>> {
        let mut s = self.0.lock();
        if !s.receiver {
            return Err(Closed(item));
        }
        s.items.push_back(item);
        s.urgent |= urgent;
        let wake = match s.parked {
            Some(Waits::Any) => true,
            Some(Waits::Urgent) => urgent,
            None => false,
        };
        if wake {
            // Woken once: the senders after this one need not notify again.
            s.parked = None;
        }
        drop(s);
        if wake {
            self.0.wake.notify_one();
        }
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.senders -= 1;
        let wake = s.senders == 0 && s.parked.take().is_some();
        drop(s);
        if wake {
            self.0.wake.notify_one();
        }
    }
}

/// The spool thread's end. It takes the whole queue under one lock and hands the items out
/// one by one from its own buffer.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
    taken: VecDeque<T>,
}

impl<T> Receiver<T> {
    /// The next item if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        if self.taken.is_empty() {
            let mut s = self.shared.lock();
            take_all(&mut self.taken, &mut s);
        }
        self.taken.pop_front()
    }

    /// The next item, waiting for one as long as it takes (`deadline` `None`) or until
    /// `deadline`.
    pub(crate) fn recv(&mut self, deadline: Option<Instant>) -> Result<T, Empty> {
        self.wait(deadline, Waits::Any)
    }

    /// Waits until `deadline` or until an item sent with [`Sender::send`] comes, then
    /// returns the first item queued by then, if any.
    pub(crate) fn wait_until(&mut self, deadline: Instant) -> Result<T, Empty> {
        self.wait(Some(deadline), Waits::Urgent)
    }

    fn wait(&mut self, deadline: Option<Instant>, waits: Waits) -> Result<T, Empty> {
        if let Some(item) = self.taken.pop_front() {
            return Ok(item);
        }
        let mut s = self.shared.lock();
        loop {
            let ready = match waits {
                Waits::Any => !s.items.is_empty(),
                Waits::Urgent => s.urgent,
            };
            if ready || s.senders == 0 {
                break;
            }
            s.parked = Some(waits);
            match deadline {
                None => s = self.shared.wake.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let Some(left) = d.checked_duration_since(Instant::now()) else {
                        break;
                    };
                    s = self
                        .shared
                        .wake
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        s.parked = None;
        let disconnected = s.senders == 0;
        take_all(&mut self.taken, &mut s);
        drop(s);
        match self.taken.pop_front() {
            Some(item) => Ok(item),
            None if disconnected => Err(Empty::Disconnected),
            None => Err(Empty::Timeout),
        }
    }
}

/// Moves everything queued to the receiver's buffer.
fn take_all<T>(taken: &mut VecDeque<T>, s: &mut State<T>) {
    s.urgent = false;
    if taken.is_empty() {
        std::mem::swap(taken, &mut s.items);
    } else {
        taken.append(&mut s.items);
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.receiver = false;
        // Dropped outside the lock: an item's drop may send (an ack, a reply).
        let left = std::mem::take(&mut s.items);
        drop(s);
        drop(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn items_come_in_order_and_the_last_sender_gone_disconnects() {
        let (tx, mut rx) = queue();
        let tx2 = tx.clone();
        tx.send(1).unwrap();
        tx2.send_quiet(2).unwrap();
        tx.send(3).unwrap();
        assert_eq!(rx.try_recv(), Some(1));
        tx.send(4).unwrap();
        assert_eq!(rx.recv(None), Ok(2));
        assert_eq!(rx.recv(None), Ok(3));
        assert_eq!(rx.recv(None), Ok(4));
        assert_eq!(rx.try_recv(), None);
        let soon = Instant::now() + Duration::from_millis(5);
        assert_eq!(rx.recv(Some(soon)), Err(Empty::Timeout));
        assert!(Instant::now() >= soon);
        drop(tx);
        tx2.send(5).unwrap();
        drop(tx2);
        assert_eq!(rx.recv(None), Ok(5));
        assert_eq!(rx.recv(None), Err(Empty::Disconnected));
    }

    #[test]
    fn a_parked_receiver_wakes_for_a_send_and_for_the_last_sender_leaving() {
        let (tx, mut rx) = queue::<u32>();
        let far = Instant::now() + Duration::from_secs(60);
        let t = std::thread::spawn(move || {
            let first = rx.recv(None);
            let second = rx.wait_until(far);
            let third = rx.recv(Some(far));
            (first, second, third, Instant::now())
        });
        // Each send only once the receiver is parked, so each one is what wakes it.
        let parked = |tx: &Sender<u32>, waits: Waits| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while tx.0.lock().parked != Some(waits) {
                assert!(Instant::now() < deadline, "the receiver never parked");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        parked(&tx, Waits::Any);
        tx.send_quiet(7).unwrap();
        parked(&tx, Waits::Urgent);
        tx.send(8).unwrap();
        parked(&tx, Waits::Any);
        drop(tx);
        let (first, second, third, at) = t.join().unwrap();
        assert_eq!(
            (first, second, third),
            (Ok(7), Ok(8), Err(Empty::Disconnected))
        );
        assert!(at < far, "woke for the senders, not the deadline");
    }

    #[test]
    fn quiet_items_wait_for_the_deadline_of_a_gathering_receiver() {
        let (tx, mut rx) = queue::<u32>();
        let deadline = Instant::now() + Duration::from_millis(150);
        let t = std::thread::spawn(move || {
            let mut got = vec![rx.wait_until(deadline)];
            let woke = Instant::now();
            got.push(Ok(rx.try_recv().unwrap()));
            (got, woke)
        });
        for i in 0..2 {
            tx.send_quiet(i).unwrap();
        }
        let (got, woke) = t.join().unwrap();
        assert_eq!(got, vec![Ok(0), Ok(1)]);
        assert!(woke >= deadline, "a quiet item woke the gathering receiver");
    }

    #[test]
    fn a_send_after_the_receiver_is_gone_gives_the_item_back() {
        let (tx, rx) = queue();
        tx.send(1).unwrap();
        drop(rx);
        assert!(matches!(tx.send(2), Err(Closed(2))));
        assert!(matches!(tx.send_quiet(3), Err(Closed(3))));
    }
}
