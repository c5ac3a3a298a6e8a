//! The password jobs waiting for a worker, served fairly by client address: round-robin
//! over the addresses with jobs waiting, first come first served within one. So a flood
//! from a few addresses queues behind itself, and another client's login waits for at
//! most one job per address ahead of it (the login machine bounds the total).

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::ops::Bound;

#[derive(Debug)]
pub(super) struct FairQueue<T> {
    queues: BTreeMap<IpAddr, VecDeque<T>>,
    /// The address served last; the next turn goes to the first one after it.
    last: Option<IpAddr>,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            queues: BTreeMap::new(),
            last: None,
        }
    }
}

impl<T> FairQueue<T> {
    pub(super) fn push(&mut self, client: IpAddr, item: T) {
        self.queues.entry(client).or_default().push_back(item);
    }

    /// The next item: the oldest of the next address in turn.
    pub(super) fn pop(&mut self) -> Option<T> {
        let after = match self.last {
            Some(last) => self
                .queues
                .range((Bound::Excluded(last), Bound::Unbounded))
                .next()
                .map(|(k, _)| *k),
            None => None,
        };
        let key = after.or_else(|| self.queues.keys().next().copied())?;
        let queue = self.queues.get_mut(&key)?;
        let item = queue.pop_front();
        if queue.is_empty() {
            self.queues.remove(&key);
        }
        self.last = Some(key);
        item
    }

    pub(super) fn len(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_over_addresses_fifo_within_one() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let mut q = FairQueue::default();
        // A flood from a, then one job each from b and c.
        for i in 0..5 {
            q.push(a, format!("a{i}"));
        }
        q.push(c, "c0".to_owned());
        q.push(b, "b0".to_owned());
        assert_eq!(q.len(), 7);
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).take(4).collect();
        assert_eq!(order, ["a0", "b0", "c0", "a1"]);
        // A newcomer waits for at most one turn of each address ahead of it.
        q.push(b, "b1".to_owned());
        assert_eq!(q.pop().as_deref(), Some("b1"));
        let rest: Vec<String> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(rest, ["a2", "a3", "a4"]);
        assert_eq!(q.len(), 0);
        assert_eq!(q.pop(), None);
    }
}
