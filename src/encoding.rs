//! Decoding a `Content-Encoding`d body that the proxy has to rewrite.
//!
//! The sales route asks the POS for `identity`, but a compressing layer in front of the POS may
//! encode anyway. Decoding is capped so a small compressed body cannot expand without bound.

use std::io::Read;

/// Why a body could not be decoded (it is then passed on untouched).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported content-encoding {0:?}")]
    Unsupported(String),
    #[error("corrupt {0} body: {1}")]
    Corrupt(&'static str, std::io::Error),
    #[error("decoded body is larger than {0} bytes")]
    TooLarge(usize),
}

/// Decodes `body` according to a `Content-Encoding` value (a list, applied in order), producing
/// at most `limit` bytes.
pub fn decode(content_encoding: &str, body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut data = body.to_vec();
    // Encodings are listed in the order they were applied: undo them last to first.
    for coding in content_encoding.split(',').rev() {
        let coding = coding.trim().to_ascii_lowercase();
        data = match coding.as_str() {
            "" | "identity" => data,
            "gzip" | "x-gzip" => {
                read_capped(flate2::read::MultiGzDecoder::new(&data[..]), "gzip", limit)?
            }
            "deflate" => decode_deflate(&data, limit)?,
            "br" => read_capped(brotli::Decompressor::new(&data[..], 8192), "br", limit)?,
            other => return Err(DecodeError::Unsupported(other.to_string())),
        };
    }
    Ok(data)
}

/// HTTP `deflate` is zlib-wrapped, but some servers send raw deflate: accept both.
fn decode_deflate(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    read_capped(flate2::read::ZlibDecoder::new(data), "deflate", limit)
        .or_else(|_| read_capped(flate2::read::DeflateDecoder::new(data), "deflate", limit))
}

fn read_capped(
    reader: impl Read,
    name: &'static str,
    limit: usize,
) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Corrupt(name, e))?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge(limit));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn round_trips() {
        let text = br#"{"success":true}"#;
        assert_eq!(decode("gzip", &gzip(text), 1000).unwrap(), text);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(text).unwrap();
        assert_eq!(decode("deflate", &z.finish().unwrap(), 1000).unwrap(), text);
        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(text).unwrap();
        assert_eq!(
            decode("Deflate", &raw.finish().unwrap(), 1000).unwrap(),
            text
        );
        let mut br = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            w.write_all(text).unwrap();
        }
        assert_eq!(decode("br", &br, 1000).unwrap(), text);
        assert_eq!(decode("identity", text, 1000).unwrap(), text);
        // two layers: gzip applied, then gzip again
        assert_eq!(
            decode("gzip, gzip", &gzip(&gzip(text)), 1000).unwrap(),
            text
        );
    }

    #[test]
    fn refuses_what_it_cannot_or_should_not_decode() {
        assert!(matches!(
            decode("zstd", b"x", 10),
            Err(DecodeError::Unsupported(_))
        ));
        assert!(matches!(
            decode("gzip", b"not gzip", 10),
            Err(DecodeError::Corrupt(..))
        ));
        let bomb = gzip(&vec![b'a'; 100_000]);
        assert!(matches!(
            decode("gzip", &bomb, 1000),
            Err(DecodeError::TooLarge(1000))
        ));
    }
}
