//! One slot of the state table: its shared-data key and its 25 bytes (version, fingerprint, and
//! the bucket's [`State`]).

use super::Fingerprint;
use crate::algorithm::State;

/// The shared-data keys the filter writes, all under the configured prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKey {
    /// Slot `i` of the state table: `<prefix>:<i>`.
    Slot(u32),
    /// The per-process hash seed: `<prefix>:seed`.
    Seed,
}

/// A shared-data key rendered into a fixed buffer, so the hot path does not allocate.
pub struct KeyBuf {
    bytes: [u8; 80],
    len: usize,
}

impl KeyBuf {
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written (the prefix is validated to ASCII).
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }

    fn push(&mut self, part: &[u8]) {
        let end = (self.len + part.len()).min(self.bytes.len());
        let n = end - self.len;
        self.bytes[self.len..end].copy_from_slice(&part[..n]);
        self.len = end;
    }
}

/// Builds the shared-data key for `key` under `prefix` (at most 64 ASCII characters, validated
/// at configuration time).
pub fn store_key(prefix: &str, key: StoreKey) -> KeyBuf {
    let mut buf = KeyBuf { bytes: [0; 80], len: 0 };
    buf.push(prefix.as_bytes());
    buf.push(b":");
    match key {
        StoreKey::Slot(index) => {
            let mut digits = [0u8; 10];
            let mut n = index;
            let mut start = digits.len();
            loop {
                start -= 1;
                digits[start] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            buf.push(&digits[start..]);
        }
        StoreKey::Seed => buf.push(b"seed"),
    }
    buf
}

pub const SLOT_VERSION: u8 = 1;
/// version, fingerprint, idle_at, word
pub const SLOT_LEN: usize = 1 + 8 + 8 + 8;
pub const EMPTY_SLOT: [u8; SLOT_LEN] = empty_slot();

const fn empty_slot() -> [u8; SLOT_LEN] {
    let mut bytes = [0u8; SLOT_LEN];
    bytes[0] = SLOT_VERSION;
    bytes
}

/// Fingerprint of a slot no key has ever used. Every key is placed in the first free slot of its
/// window, and a used slot never becomes never-used again, so a scan may stop at the first one.
pub const NEVER_USED: u64 = 0;
/// Fingerprint of a slot that was used and emptied (a folded duplicate, unreadable bytes): free,
/// but scans go on past it.
pub const TOMBSTONE: u64 = 1;

/// How long after its bucket turns fresh a slot stays its key's. Workers read the clock at
/// slightly different moments (and a worker can be descheduled between reading it and using it):
/// a slot taken by another key at the exact instant the first key's state expired would let a
/// worker whose reading is a moment earlier start the first key afresh, admitting twice in one
/// window. With the margin, a worker's reading must lag by a whole second for that to happen.
pub const REUSE_MARGIN_NANOS: u64 = 1_000_000_000;

/// One decoded slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub fingerprint: u64,
    pub state: State,
}

impl Slot {
    pub const EMPTIED: Slot = Slot { fingerprint: TOMBSTONE, state: State { idle_at: 0, word: 0 } };

    pub fn holding(fp: Fingerprint, state: State) -> Slot {
        Slot { fingerprint: fp.0, state }
    }

    pub fn decode(bytes: &[u8]) -> Slot {
        if bytes.len() != SLOT_LEN || bytes[0] != SLOT_VERSION {
            // Unreadable bytes (another layout under the same prefix) hold nothing of ours.
            return Slot::EMPTIED;
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        Slot { fingerprint: word(1), state: State { idle_at: word(9), word: word(17) } }
    }

    pub fn encode(self) -> [u8; SLOT_LEN] {
        let mut bytes = EMPTY_SLOT;
        bytes[1..9].copy_from_slice(&self.fingerprint.to_le_bytes());
        bytes[9..17].copy_from_slice(&self.state.idle_at.to_le_bytes());
        bytes[17..25].copy_from_slice(&self.state.word.to_le_bytes());
        bytes
    }

    /// Holds nothing live at `now`: never used, emptied, or a bucket back to its fresh state for at
    /// least [`REUSE_MARGIN_NANOS`].
    pub fn is_free(self, now: u64) -> bool {
        self.fingerprint == NEVER_USED
            || self.fingerprint == TOMBSTONE
            || self.state.idle_at.saturating_add(REUSE_MARGIN_NANOS) <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_and_seed_keys_live_under_the_prefix() {
        assert_eq!(store_key("rl", StoreKey::Slot(0)).as_str(), "rl:0");
        assert_eq!(store_key("rl", StoreKey::Slot(4_294_967_295)).as_str(), "rl:4294967295");
        assert_eq!(store_key("a.b-c", StoreKey::Seed).as_str(), "a.b-c:seed");
        let long = "p".repeat(64);
        assert_eq!(store_key(&long, StoreKey::Slot(16_777_215)).as_str(), format!("{long}:16777215"));
    }
}
