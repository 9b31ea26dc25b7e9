//! `quotebridge health`: asks a running bridge whether it is alive
//! (`/healthz`) or ready (`/readyz`), for container health checks: the slim
//! image has no curl, and the binary knows where it listens.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Error;

/// How long the whole check may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Where to reach a bridge listening on `listen` from the same host: an
/// unspecified address (`0.0.0.0`, `::`) is reached on loopback.
#[must_use]
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// GETs `path` from the bridge at `address`; Ok when it answers 200.
pub async fn check(address: SocketAddr, path: &str) -> Result<(), Error> {
    let url = format!("http://{address}{path}");
    let status = tokio::time::timeout(TIMEOUT, status_of(address, path))
        .await
        .map_err(|_| Error::Input(format!("{url}: no answer within {TIMEOUT:?}")))?
        .map_err(|e| Error::io(format!("cannot ask {url}"), e))?;
    if status == 200 {
        Ok(())
    } else {
        Err(Error::Input(format!("{url} answered {status}")))
    }
}

/// The body of `GET path` (the benchmark reads `/stats` this way).
pub(crate) async fn body_of(address: SocketAddr, path: &str) -> std::io::Result<String> {
    let read = async {
        let mut stream = TcpStream::connect(address).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let response = String::from_utf8_lossy(&response);
        Ok(response
            .split_once("\r\n\r\n")
            .map_or_else(String::new, |(_, body)| body.to_owned()))
    };
    tokio::time::timeout(TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

/// The status code of `GET path`.
async fn status_of(address: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(address).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    // The status line is all we need: "HTTP/1.1 200 OK".
    let mut head = Vec::with_capacity(64);
    while !head.contains(&b'\n') && head.len() < 1024 {
        let mut chunk = [0u8; 256];
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..read]);
    }
    let line = String::from_utf8_lossy(&head);
    line.strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "not an HTTP answer: {:?}",
                    line.lines().next().unwrap_or("")
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_reached_on_loopback() {
        let local = |listen: &str| local_address(listen.parse().expect("address")).to_string();
        assert_eq!(local("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(local("[::]:8080"), "[::1]:8080");
        assert_eq!(local("10.1.2.3:9000"), "10.1.2.3:9000");
    }
}
