//! The metrics endpoint: `/metrics` (OpenMetrics text), `/healthz` (the process answers) and
//! `/readyz` (ready to deliver: the journal is open and the destination does not refuse us).
//! HTTP/1.1 by hyper, bound to the configured address only (default off; `127.0.0.1:9464` is
//! the usual choice: the numbers tell what moves, never what it is).
//!
//! Must not break: the paths and their status codes (200 ready / 503 not ready); nothing served
//! names a key, a path or a secret.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the endpoint asks of the process it serves.
pub trait Exporter: Send + Sync + 'static {
    /// The exposition, fresh.
    fn metrics(&self) -> Pin<Box<dyn Future<Output = String> + Send + '_>>;
    /// Ready, or why not.
    fn ready(&self) -> Result<(), String>;
}

/// Binds `addr` (an error says so at once: a taken port must not pass silently).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `stop`.
pub async fn serve<E: Exporter>(
    listener: TcpListener,
    exporter: Arc<E>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics: accept failed");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let exporter = exporter.clone();
                async move { Ok::<_, Infallible>(answer(&*exporter, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A scrape is small; a client that stalls is dropped.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

/// The answer to one request.
async fn answer<E: Exporter, B>(exporter: &E, req: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(ctype),
        );
        r
    };
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        // Prometheus asks for OpenMetrics (its Accept header says so); anything else (curl,
        // promtool, older scrapers) gets the classic text format.
        "/metrics" if accepts_openmetrics(req) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            exporter.metrics().await,
        ),
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            classic_text(&exporter.metrics().await),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match exporter.ready() {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

/// Whether the scraper asks for OpenMetrics.
fn accepts_openmetrics<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// OpenMetrics text as the classic Prometheus text format (0.0.4): the two differ, for what
/// `prometheus-client` writes, only in that a counter's HELP and TYPE name the family
/// (`x`) where the classic format names the sample (`x_total`), and in the `# EOF` and
/// `# UNIT` lines, which the classic format does not have.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters are named by their samples; the OpenMetrics-only lines go.
    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let om =
            "# HELP a_objects Objects.\n# TYPE a_objects counter\na_objects_total{s=\"x\"} 3\n\
                  # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n# EOF\n";
        assert_eq!(
            classic_text(om),
            "# HELP a_objects_total Objects.\n# TYPE a_objects_total counter\n\
             a_objects_total{s=\"x\"} 3\n# HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n"
        );
    }
}
