//! The top-level members of a JSON object, each with the exact byte span of its value.
//!
//! Both sides of the sales route need the POS's JSON *as written*: the sale parser reads money
//! as the raw number text (never through `f64`), and the response rewrite splices new bytes into
//! the original document so every byte it does not change stays exactly as the POS sent it.
//! serde_json validates the document and hands out borrowed `RawValue`s; their position in the
//! input gives the spans.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// One `"key": value` member of an object.
#[derive(Debug, Clone)]
pub struct Member<'a> {
    pub key: Cow<'a, str>,
    pub value: &'a RawValue,
}

/// The members of a JSON object in document order (duplicates kept, as written).
#[derive(Debug, Clone)]
pub struct Object<'a> {
    source: &'a str,
    pub members: Vec<Member<'a>>,
}

struct Members<'a>(Vec<Member<'a>>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((Text(key), value)) = map.next_entry::<Text<'de>, &'de RawValue>()? {
                    members.push(Member { key, value });
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> Object<'a> {
    /// Parses `source` as one JSON object (whitespace around it allowed).
    pub fn parse(source: &'a str) -> Result<Self, serde_json::Error> {
        let Members(members) = serde_json::from_str(source)?;
        Ok(Object { source, members })
    }

    /// Parses UTF-8 bytes as one JSON object.
    pub fn parse_bytes(source: &'a [u8]) -> Result<Self, ParseError> {
        let text = std::str::from_utf8(source).map_err(|_| ParseError::NotUtf8)?;
        Ok(Self::parse(text)?)
    }

    /// The value of the *last* member named `key`, as JavaScript's `JSON.parse` would keep it.
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.members
            .iter()
            .rev()
            .find(|m| m.key == key)
            .map(|m| m.value)
    }

    /// Every member named `key` (a document may repeat a key).
    pub fn all<'s>(&'s self, key: &'s str) -> impl Iterator<Item = &'s Member<'a>> + 's {
        self.members.iter().filter(move |m| m.key == key)
    }

    /// Byte range of `value` inside the source.
    pub fn span(&self, value: &RawValue) -> Range<usize> {
        span_in(self.source, value)
    }

    /// Where a new member can be appended: right after the last value, or after `{`.
    pub fn append_position(&self) -> usize {
        match self.members.iter().map(|m| self.span(m.value).end).max() {
            Some(end) => end,
            None => self.source.find('{').map_or(0, |i| i + 1),
        }
    }

    pub fn source(&self) -> &'a str {
        self.source
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// Byte range of a borrowed `RawValue` inside the text it was parsed from.
pub fn span_in(source: &str, value: &RawValue) -> Range<usize> {
    let start = value.get().as_ptr() as usize - source.as_ptr() as usize;
    start..start + value.get().len()
}

/// The string a raw value holds, if it is a JSON string.
pub fn as_str(value: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str::<Text<'_>>(value.get())
        .ok()
        .map(|t| t.0)
}

/// A JSON string that borrows from the source unless it has escapes. serde's own
/// `Cow<str>` always allocates (it deserializes a `String`); keys and string values are read on
/// every sale, so this saves an allocation and a copy for each.
struct Text<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Why bytes are not a JSON object.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not UTF-8")]
    NotUtf8,
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_point_at_the_raw_values() {
        let src = r#" { "a" : 10.10 , "b":[1, 2] ,"c":{"x":"y"} } "#;
        let obj = Object::parse(src).unwrap();
        let got: Vec<_> = obj
            .members
            .iter()
            .map(|m| (m.key.to_string(), &src[obj.span(m.value)]))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".to_string(), "10.10"),
                ("b".to_string(), "[1, 2]"),
                ("c".to_string(), r#"{"x":"y"}"#)
            ]
        );
        assert_eq!(
            &src[..obj.append_position()],
            r#" { "a" : 10.10 , "b":[1, 2] ,"c":{"x":"y"}"#
        );
    }

    #[test]
    fn last_duplicate_wins_and_escaped_keys_decode() {
        let src = r#"{"k":1,"\u006b":2}"#;
        let obj = Object::parse(src).unwrap();
        assert_eq!(obj.get("k").unwrap().get(), "2");
        assert_eq!(obj.all("k").count(), 2);
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let escaped = serde_json::from_str::<&RawValue>(r#""Ren\u00e9 ok""#).unwrap();
        assert_eq!(as_str(escaped).as_deref(), Some("René ok"));
        let raw = serde_json::from_str::<&RawValue>(r#""plain""#).unwrap();
        assert!(matches!(as_str(raw), Some(Cow::Borrowed("plain"))));
        let obj = Object::parse(r#"{"a\tb":1,"c":2}"#).unwrap();
        assert!(matches!(&obj.members[1].key, Cow::Borrowed("c")));
        assert_eq!(obj.members[0].key, "a\tb");
        for not_a_string in ["1", "null", "[\"a\"]", "{}"] {
            let raw = serde_json::from_str::<&RawValue>(not_a_string).unwrap();
            assert!(as_str(raw).is_none(), "{not_a_string}");
        }
    }

    #[test]
    fn non_objects_are_errors() {
        for src in ["[1,2]", "null", "", "{", "{\"a\":1} x", "\"s\""] {
            assert!(Object::parse(src).is_err(), "{src}");
        }
        assert!(Object::parse_bytes(b"\xff").is_err());
        let empty = Object::parse(" {  } ").unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.append_position(), 2);
    }
}
