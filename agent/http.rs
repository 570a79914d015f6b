//! The agent's one HTTP client: the AWS IoT credentials provider (over mutual TLS), `edgeship
//! status` asking the running agent (plain loopback), and the S3 destination's signed
//! requests. One request per connection, HTTP/1.1 through hyper's client connection, the
//! answer's body bounded.
//!
//! It never follows redirects, never retries, and never reads more than the caller allows.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use tokio::io::{AsyncRead, AsyncWrite};

/// A received answer.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: hyper::HeaderMap,
    pub(crate) body: Bytes,
}

impl Answer {
    /// The body as text, for messages (cut to `max` characters).
    pub(crate) fn text(&self, max: usize) -> String {
        String::from_utf8_lossy(&self.body)
            .chars()
            .take(max)
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP: {0}")]
    Handshake(#[source] hyper::Error),
    /// Sending the request or reading the answer's head failed; the source tells why (a TLS
    /// alert from the server shows up here).
    #[error("HTTP: {0}")]
    Request(#[source] hyper::Error),
    #[error("HTTP request: {0}")]
    Build(#[from] hyper::http::Error),
    #[error("reading the answer: {0}")]
    Body(String),
}

/// GETs `path` over `stream` (already connected, TLS done), with `host` and `headers`; the
/// body may be at most `max_body` bytes.
pub(crate) async fn get<S>(
    stream: S,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    max_body: usize,
) -> Result<Answer, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut request = hyper::Request::get(path).header(hyper::header::HOST, host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(stream, request.body(Full::new(Bytes::new()))?, max_body).await
}

/// Sends `request` over `stream` (already connected, TLS done; the request carries its own
/// `Host`) and reads the answer, whose body may be at most `max_body` bytes.
pub(crate) async fn send<S>(
    stream: S,
    mut request: hyper::Request<Full<Bytes>>,
    max_body: usize,
) -> Result<Answer, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(HttpError::Handshake)?;
    let driver = tokio::spawn(connection);
    request.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    let result = async {
        let answer = sender
            .send_request(request)
            .await
            .map_err(HttpError::Request)?;
        let status = answer.status().as_u16();
        let headers = answer.headers().clone();
        let body = Limited::new(answer.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| HttpError::Body(e.to_string()))?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_get_sends_its_headers_and_reads_a_bounded_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                .await
                .unwrap();
            head
        });
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let a = get(stream, "h.example", "/x", &[("x-thing", "t1")], 100)
            .await
            .unwrap();
        assert_eq!((a.status, a.text(100).as_str()), (200, "hello"));
        let head = server.await.unwrap().to_lowercase();
        assert!(head.starts_with("get /x http/1.1"), "{head}");
        assert!(
            head.contains("host: h.example") && head.contains("x-thing: t1"),
            "{head}"
        );

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
                .await;
            let _ = s.write_all(&[b'x'; 1000]).await;
        });
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(matches!(
            get(stream, "h", "/", &[], 10).await,
            Err(HttpError::Body(_))
        ));
    }
}
