//! The one check of a stored object, used by the agent's sink and by the relay's S3 landing:
//! HEAD the key; the size must be ours, and
//! - an object uploaded with a full-object CRC-64/NVME (`x-amz-checksum-type: FULL_OBJECT`,
//!   which the server checked at completion) must report that checksum, ours;
//! - any other must carry our SHA-256 in `x-amz-meta-sha256`;
//! - a checksum the server reports (`x-amz-checksum-sha256`, whole or composite;
//!   `x-amz-meta-sha256` where set) must be the one of our bytes.
//!
//! Must not break: an object passes only if every check that the server's answer allows
//! passes; the checksum the upload relies on (the CRC-64/NVME asked for, or
//! `x-amz-meta-sha256`) missing is a failure, never a pass.

use crate::hash::Sha256;

use super::multipart::PartRow;
use super::{b64, Head, S3Client, S3Error};

/// Why a stored object is not the one sent.
#[derive(Debug, thiserror::Error)]
pub enum Mismatch {
    #[error("the object is not there after the upload")]
    Missing,
    #[error("size {server} on the server, {ours} here")]
    Size { server: u64, ours: u64 },
    #[error("x-amz-meta-sha256 is {server}, expected {ours}")]
    Sha256 { server: String, ours: String },
    #[error("the server did not keep x-amz-meta-sha256")]
    NoSha256,
    #[error("x-amz-checksum-crc64nvme is {server}, expected {ours}")]
    Crc64 { server: String, ours: String },
    #[error("the server reported no x-amz-checksum-crc64nvme for an upload checked by it")]
    NoCrc64,
    #[error("x-amz-checksum-sha256 is {server}, expected {whole} or {composite:?}")]
    Checksum {
        server: String,
        whole: String,
        composite: Option<String>,
    },
}

/// Why `verify` failed: the HEAD itself, or what it showed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
}

/// HEADs `key` and checks it against what was sent: `size` bytes with SHA-256 `sha`, and for a
/// multipart upload its `parts` (for the composite checksum).
pub async fn verify(
    client: &S3Client,
    key: &str,
    size: u64,
    sha: &[u8; 32],
    parts: Option<&[PartRow]>,
) -> Result<Head, VerifyError> {
    verify_full(client, key, size, sha, None, parts).await
}

/// `verify`, for an upload with a full-object CRC-64/NVME (`crc64nvme`): that checksum, not
/// `x-amz-meta-sha256`, must be on the object.
pub async fn verify_full(
    client: &S3Client,
    key: &str,
    size: u64,
    sha: &[u8; 32],
    crc64nvme: Option<u64>,
    parts: Option<&[PartRow]>,
) -> Result<Head, VerifyError> {
    let head = client.head_object(key).await?.ok_or(Mismatch::Missing)?;
    check(&head, size, sha, parts).or_else(|e| match (e, crc64nvme) {
        // No metadata on a CRC-checked upload: the CRC decides (below).
        (Mismatch::NoSha256, Some(_)) => Ok(()),
        (e, _) => Err(e),
    })?;
    if let Some(crc) = crc64nvme {
        check_crc(&head, crc)?;
    }
    Ok(head)
}

/// The server's full-object CRC-64/NVME must be there and be ours.
pub fn check_crc(head: &Head, crc64nvme: u64) -> Result<(), Mismatch> {
    let ours = crate::hash::Crc64Nvme::b64(crc64nvme);
    match &head.checksum_crc64nvme {
        Some(cs) if *cs == ours => Ok(()),
        Some(cs) => Err(Mismatch::Crc64 {
            server: cs.clone(),
            ours,
        }),
        None => Err(Mismatch::NoCrc64),
    }
}

/// The checks of `verify` on an answer already at hand.
pub fn check(
    head: &Head,
    size: u64,
    sha: &[u8; 32],
    parts: Option<&[PartRow]>,
) -> Result<(), Mismatch> {
    if head.size != size {
        return Err(Mismatch::Size {
            server: head.size,
            ours: size,
        });
    }
    let ours = hex::encode(sha);
    match &head.meta_sha256 {
        Some(m) if m.eq_ignore_ascii_case(&ours) => {}
        Some(m) => {
            return Err(Mismatch::Sha256 {
                server: m.clone(),
                ours,
            })
        }
        None => return Err(Mismatch::NoSha256),
    }
    if let Some(cs) = &head.checksum_sha256 {
        let whole = b64(sha);
        let composite = parts.and_then(composite_checksum);
        if *cs != whole && composite.as_deref() != Some(cs.as_str()) {
            return Err(Mismatch::Checksum {
                server: cs.clone(),
                whole,
                composite,
            });
        }
    }
    Ok(())
}

/// S3's checksum of a multipart object: SHA-256 over the parts' SHA-256s, then "-N" (None if
/// a part was sent without its SHA-256: then the upload was not checked by SHA-256).
pub fn composite_checksum(parts: &[PartRow]) -> Option<String> {
    use base64::Engine as _;
    let mut h = Sha256::new();
    for p in parts {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(p.sha256_b64.as_ref()?)
            .ok()?;
        h.update(raw);
    }
    Some(format!("{}-{}", b64(&h.finalize()), parts.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(number: u32, body: &[u8]) -> PartRow {
        PartRow {
            number,
            size: body.len() as u64,
            sha256_b64: Some(b64(&Sha256::digest(body))),
            crc64nvme_b64: None,
            etag: String::new(),
        }
    }

    /// The composite checksum: SHA-256 over the parts' SHA-256s, then `-N`.
    #[test]
    fn composite_checksum_matches_s3_definition() {
        let parts = vec![part(1, b"a"), part(2, b"b")];
        let mut h = Sha256::new();
        h.update(Sha256::digest(b"a"));
        h.update(Sha256::digest(b"b"));
        assert_eq!(
            composite_checksum(&parts),
            Some(format!("{}-2", b64(&h.finalize())))
        );
    }

    /// Each check fails on its own; a head with no checksum passes on size and metadata.
    #[test]
    fn every_check_can_fail_alone() {
        let sha = Sha256::digest(b"ab");
        let parts = vec![part(1, b"a"), part(2, b"b")];
        let good = Head {
            size: 2,
            meta_sha256: Some(hex::encode(sha)),
            checksum_sha256: composite_checksum(&parts),
            ..Head::default()
        };
        assert!(check(&good, 2, &sha, Some(&parts)).is_ok());
        let whole = Head {
            checksum_sha256: Some(b64(&sha)),
            ..good.clone()
        };
        assert!(check(&whole, 2, &sha, None).is_ok());
        let none = Head {
            checksum_sha256: None,
            ..good.clone()
        };
        assert!(check(&none, 2, &sha, None).is_ok());
        assert!(matches!(
            check(&good, 3, &sha, Some(&parts)),
            Err(Mismatch::Size { .. })
        ));
        let other = Head {
            meta_sha256: Some(hex::encode([0u8; 32])),
            ..good.clone()
        };
        assert!(matches!(
            check(&other, 2, &sha, Some(&parts)),
            Err(Mismatch::Sha256 { .. })
        ));
        let lost = Head {
            meta_sha256: None,
            ..good.clone()
        };
        assert!(matches!(
            check(&lost, 2, &sha, Some(&parts)),
            Err(Mismatch::NoSha256)
        ));
        assert!(matches!(
            check(&good, 2, &sha, None),
            Err(Mismatch::Checksum { .. })
        ));
    }
}
