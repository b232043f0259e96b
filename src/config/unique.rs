//! Refusing a field given twice in one JSON object: serde_json would silently keep the last, so a
//! copy-pasted `"capacity"` could hide the limit the author meant.

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::ConfigError;

/// `Err` naming the first field given twice, by its JSON path. Bytes that are not JSON pass: the
/// parse proper says what is wrong with them.
pub(super) fn refuse_duplicate_fields(bytes: &[u8]) -> Result<(), ConfigError> {
    let mut duplicate = None;
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let walk = Walk { path: String::new(), duplicate: &mut duplicate };
    if walk.deserialize(&mut json).is_err() {
        if let Some(path) = duplicate {
            return Err(ConfigError::at(path, "given twice; each field may appear once"));
        }
    }
    Ok(())
}

/// Visits a JSON value at `path`, recording the path of the first duplicate field found.
struct Walk<'a> {
    path: String,
    duplicate: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            let path = format!("{}[{index}]", self.path);
            if seq.next_element_seed(Walk { path, duplicate: &mut *self.duplicate })?.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() { key.clone() } else { format!("{}.{key}", self.path) };
            if !seen.insert(key) {
                *self.duplicate = Some(path);
                return Err(de::Error::custom("duplicate field"));
            }
            map.next_value_seed(Walk { path, duplicate: &mut *self.duplicate })?;
        }
        Ok(())
    }
}
