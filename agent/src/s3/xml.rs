//! The few S3 XML documents ha-edge reads and writes.
//!
//! Must not break: parsing never panics on a hostile document; unknown elements are ignored.

/// An S3 `<Error>` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorDoc {
    /// `<Code>`: the S3 error code.
    pub code: String,
    /// `<Message>`: the server's explanation.
    pub message: String,
}

/// One part a server holds for a multipart upload (ListParts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerPart {
    /// The part number (1-based).
    pub number: u32,
    /// The part's ETag, as the server sent it.
    pub etag: String,
    /// The part's size in bytes.
    pub size: u64,
}

/// One page of a ListParts answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartsPage {
    /// The parts on this page, in order.
    pub parts: Vec<ServerPart>,
    /// Where the next page starts, if the listing is truncated.
    pub next_marker: Option<u32>,
}

/// The text of `node`'s first child element `name`.
fn child_text<'a>(node: roxmltree::Node<'a, 'a>, name: &str) -> Option<&'a str> {
    node.children()
        .find(|c| c.tag_name().name() == name)
        .and_then(|c| c.text())
}

/// An `<Error>` document, if `body` is one.
pub fn parse_error(body: &str) -> Option<ErrorDoc> {
    let doc = roxmltree::Document::parse(body).ok()?;
    let root = doc.root_element();
    if root.tag_name().name() != "Error" {
        return None;
    }
    Some(ErrorDoc {
        code: child_text(root, "Code").unwrap_or_default().to_string(),
        message: child_text(root, "Message").unwrap_or_default().to_string(),
    })
}

/// The `UploadId` of a CreateMultipartUpload answer.
pub fn parse_upload_id(body: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(body).ok()?;
    child_text(doc.root_element(), "UploadId").map(str::to_string)
}

/// Upload ids for exactly `key` in a `ListMultipartUploadsResult` (other keys under the same
/// prefix are ignored).
pub fn parse_uploads_for_key(body: &str, key: &str) -> Option<Vec<String>> {
    let doc = roxmltree::Document::parse(body).ok()?;
    let root = doc.root_element();
    if root.tag_name().name() != "ListMultipartUploadsResult" {
        return None;
    }
    Some(
        root.children()
            .filter(|c| c.tag_name().name() == "Upload")
            .filter(|u| child_text(*u, "Key") == Some(key))
            .filter_map(|u| child_text(u, "UploadId").map(str::to_string))
            .collect(),
    )
}

/// A ListParts answer; None if it is not one.
pub fn parse_list_parts(body: &str) -> Option<PartsPage> {
    let doc = roxmltree::Document::parse(body).ok()?;
    let root = doc.root_element();
    if root.tag_name().name() != "ListPartsResult" {
        return None;
    }
    let mut parts = Vec::new();
    for p in root.children().filter(|c| c.tag_name().name() == "Part") {
        parts.push(ServerPart {
            number: child_text(p, "PartNumber")?.trim().parse().ok()?,
            etag: child_text(p, "ETag").unwrap_or_default().to_string(),
            size: child_text(p, "Size")?.trim().parse().ok()?,
        });
    }
    let truncated = child_text(root, "IsTruncated").map(str::trim) == Some("true");
    let next_marker = if truncated {
        child_text(root, "NextPartNumberMarker").and_then(|m| m.trim().parse().ok())
    } else {
        None
    };
    Some(PartsPage { parts, next_marker })
}

/// One object in a `ListBucketResult` (ListObjectsV2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The object's key (decoded).
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// As the server sends it (quoted); some servers leave it out of listings.
    pub etag: Option<String>,
    /// RFC 3339, e.g. `2026-11-26T10:00:00.000Z`.
    pub last_modified: Option<String>,
}

/// One page of a ListObjectsV2 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// The objects on this page, in key order.
    pub objects: Vec<Listed>,
    /// Continuation token for the next page, if the listing is truncated.
    pub next_token: Option<String>,
}

/// A ListObjectsV2 answer; None if it is not one.
pub fn parse_list_objects(body: &str) -> Option<ListPage> {
    let doc = roxmltree::Document::parse(body).ok()?;
    let root = doc.root_element();
    if root.tag_name().name() != "ListBucketResult" {
        return None;
    }
    let mut objects = Vec::new();
    for o in root
        .children()
        .filter(|c| c.tag_name().name() == "Contents")
    {
        objects.push(Listed {
            key: child_text(o, "Key")?.to_string(),
            size: child_text(o, "Size")?.trim().parse().ok()?,
            etag: child_text(o, "ETag").map(str::to_string),
            last_modified: child_text(o, "LastModified").map(|t| t.trim().to_string()),
        });
    }
    let truncated = child_text(root, "IsTruncated").map(str::trim) == Some("true");
    let next_token = if truncated {
        child_text(root, "NextContinuationToken").map(str::to_string)
    } else {
        None
    };
    Some(ListPage {
        objects,
        next_token,
    })
}

/// XML-escapes text for a document ha-edge writes.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The CompleteMultipartUpload body: (part number, ETag, base64 checksum) in part order, each
/// checksum in `checksum_element` (`ChecksumSHA256`, `ChecksumCRC64NVME`).
pub fn complete_body<'a>(
    checksum_element: &str,
    parts: impl IntoIterator<Item = (u32, &'a str, &'a str)>,
) -> String {
    let mut s =
        String::from("<CompleteMultipartUpload xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">");
    for (n, etag, sum) in parts {
        s.push_str(&format!(
            "<Part><PartNumber>{n}</PartNumber><ETag>{}</ETag><{checksum_element}>{}</{checksum_element}></Part>",
            escape(etag),
            escape(sum)
        ));
    }
    s.push_str("</CompleteMultipartUpload>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ListObjectsV2 page: keys decoded, sizes, ETags, times, the continuation token.
    #[test]
    fn list_objects_v2_page() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>exports</Name><Prefix>fhir/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>
  <IsTruncated>true</IsTruncated>
  <Contents><Key>fhir/a &amp; b.ndjson</Key><LastModified>2026-11-26T10:00:00.000Z</LastModified>
    <ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag><Size>42</Size>
    <StorageClass>STANDARD</StorageClass></Contents>
  <Contents><Key>fhir/big.dcm</Key><LastModified>2026-11-26T10:00:01Z</LastModified><Size>7</Size></Contents>
  <NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>
</ListBucketResult>"#;
        let page = parse_list_objects(body).unwrap();
        assert_eq!(page.objects.len(), 2);
        assert_eq!(page.objects[0].key, "fhir/a & b.ndjson");
        assert_eq!(page.objects[0].size, 42);
        assert_eq!(
            page.objects[0].etag.as_deref(),
            Some("\"9b2cf535f27731c974343645a3985328\"")
        );
        assert_eq!(page.objects[1].etag, None);
        assert_eq!(
            page.next_token.as_deref(),
            Some("1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=")
        );
        let last = body.replace("<IsTruncated>true", "<IsTruncated>false");
        assert_eq!(parse_list_objects(&last).unwrap().next_token, None);
        assert!(parse_list_objects("<Error><Code>x</Code></Error>").is_none());
    }

    /// An `<Error>` body's code and message.
    #[test]
    fn error_document() {
        let e = parse_error(
            "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message><BucketName>x</BucketName></Error>",
        )
        .unwrap();
        assert_eq!(e.code, "NoSuchBucket");
        assert!(parse_error("<ListPartsResult/>").is_none());
        assert!(parse_error("not xml").is_none());
    }

    /// A ListParts page and where the next starts.
    #[test]
    fn list_parts_with_pagination() {
        let body = r#"<ListPartsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
            <IsTruncated>true</IsTruncated><NextPartNumberMarker>2</NextPartNumberMarker>
            <Part><PartNumber>1</PartNumber><ETag>"a"</ETag><Size>5242880</Size></Part>
            <Part><PartNumber>2</PartNumber><ETag>&quot;b&quot;</ETag><Size>10</Size></Part>
        </ListPartsResult>"#;
        let p = parse_list_parts(body).unwrap();
        assert_eq!(p.parts.len(), 2);
        assert_eq!(p.parts[1].etag, "\"b\"");
        assert_eq!(p.next_marker, Some(2));
    }

    /// The UploadId of CreateMultipartUpload, and the body of CompleteMultipartUpload.
    #[test]
    fn upload_id_and_complete_body() {
        assert_eq!(
            parse_upload_id("<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key><UploadId>u+1/=</UploadId></InitiateMultipartUploadResult>").as_deref(),
            Some("u+1/=")
        );
        let b = complete_body("ChecksumSHA256", [(1, "\"e1\"", "c2hh")]);
        assert!(b.contains("<ETag>&quot;e1&quot;</ETag>"), "{b}");
        assert!(b.contains("<ChecksumSHA256>c2hh</ChecksumSHA256>"));
    }

    /// ListMultipartUploads answers are filtered to the key asked for.
    #[test]
    fn uploads_for_one_key_only() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>b</Bucket><Prefix>fhir/a.ndjson</Prefix><IsTruncated>false</IsTruncated>
  <Upload><Key>fhir/a.ndjson</Key><UploadId>u1</UploadId></Upload>
  <Upload><Key>fhir/a.ndjson.bak</Key><UploadId>u2</UploadId></Upload>
  <Upload><Key>fhir/a.ndjson</Key><UploadId>u3</UploadId></Upload>
</ListMultipartUploadsResult>"#;
        assert_eq!(
            parse_uploads_for_key(body, "fhir/a.ndjson"),
            Some(vec!["u1".to_string(), "u3".to_string()])
        );
        assert_eq!(parse_uploads_for_key("<Error/>", "k"), None);
    }
}
