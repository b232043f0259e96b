//! Requests held for their turn (limits with `max_delay`): which request is due when, and how many
//! of a key wait in this worker. The worker's tick resumes the requests that are due, in the order
//! of their turns, which for one key is the order they arrived in.

use std::collections::HashMap;

/// The requests of one worker that wait for their turn.
#[derive(Debug, Default)]
pub struct Queue {
    /// (turn, arrival number, request), kept sorted.
    waiting: Vec<(u64, u64, u32)>,
    /// The keys (fingerprints of delayed limits) each waiting request counts against.
    keys_of: HashMap<u32, Vec<u64>>,
    per_key: HashMap<u64, u32>,
    arrivals: u64,
}

impl Queue {
    /// How many requests wait for this key.
    pub fn waiting_for(&self, key: u64) -> u32 {
        self.per_key.get(&key).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Request `id` waits until `turn`, counting against `keys`.
    pub fn add(&mut self, id: u32, turn: u64, keys: Vec<u64>) {
        self.arrivals += 1;
        let entry = (turn, self.arrivals, id);
        let at = self.waiting.partition_point(|e| *e < entry);
        self.waiting.insert(at, entry);
        for key in &keys {
            *self.per_key.entry(*key).or_default() += 1;
        }
        self.keys_of.insert(id, keys);
    }

    /// Takes request `id` out of the queue; whether it was still waiting.
    pub fn remove(&mut self, id: u32) -> bool {
        let Some(at) = self.waiting.iter().position(|e| e.2 == id) else { return false };
        self.waiting.remove(at);
        self.forget(id);
        true
    }

    /// The requests whose turn has come by `now`, earliest turn first, taken out of the queue.
    pub fn due(&mut self, now: u64) -> Vec<u32> {
        let count = self.waiting.partition_point(|e| e.0 <= now);
        let due: Vec<u32> = self.waiting.drain(..count).map(|e| e.2).collect();
        for id in &due {
            self.forget(*id);
        }
        due
    }

    fn forget(&mut self, id: u32) {
        for key in self.keys_of.remove(&id).unwrap_or_default() {
            if let Some(n) = self.per_key.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.per_key.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_due_in_the_order_of_their_turns_then_of_their_arrival() {
        let mut q = Queue::default();
        q.add(7, 300, vec![1]);
        q.add(8, 100, vec![1]);
        q.add(9, 100, vec![2]);
        assert_eq!((q.waiting_for(1), q.waiting_for(2)), (2, 1));
        assert_eq!(q.due(99), Vec::<u32>::new());
        assert_eq!(q.due(100), vec![8, 9]);
        assert_eq!(q.waiting_for(1), 1);
        assert!(q.remove(7));
        assert!(!q.remove(7), "already gone");
        assert!(q.len() == 0 && q.waiting_for(1) == 0);
    }
}
