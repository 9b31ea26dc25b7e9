//! Opening many benchmark sockets at once.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::Error;

/// An open benchmark socket.
pub type Socket = WebSocketStream<TcpStream>;

/// Opens `count` sockets to `address`, client code `code(i)`, 256 handshakes
/// at a time, spreading sources over `sources` local addresses (to have more
/// than one address's worth of ephemeral ports), with a receive buffer of
/// `recv_buffer` bytes if given (a small one makes a socket that stops
/// reading back up at the bridge, not in the kernel). Each socket's welcome
/// is read.
pub async fn connect_sockets(
    address: SocketAddr,
    count: usize,
    code: impl Fn(usize) -> String,
    sources: &[IpAddr],
    recv_buffer: Option<u32>,
) -> Result<Vec<Socket>, Error> {
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let attempts = (0..count).map(|i| {
        let url = format!("ws://{address}/ws/{}", code(i));
        let source = sources.get(i % sources.len().max(1)).copied();
        async move {
            let tcp = match source {
                None if recv_buffer.is_some() => {
                    let socket = TcpSocket::new_v4().map_err(|e| Error::io("socket", e))?;
                    if let Some(bytes) = recv_buffer {
                        socket
                            .set_recv_buffer_size(bytes)
                            .map_err(|e| Error::io("SO_RCVBUF", e))?;
                    }
                    socket
                        .connect(address)
                        .await
                        .map_err(|e| Error::io("connect", e))?
                }
                Some(ip) => {
                    let socket = TcpSocket::new_v4().map_err(|e| Error::io("socket", e))?;
                    // Ports still in TIME_WAIT from an earlier run may be
                    // reused; without this a second run within a minute
                    // runs out of ports on the source address.
                    socket
                        .set_reuseaddr(true)
                        .map_err(|e| Error::io("SO_REUSEADDR", e))?;
                    socket
                        .bind(SocketAddr::new(ip, 0))
                        .map_err(|e| Error::io(format!("bind {ip}"), e))?;
                    socket
                        .connect(address)
                        .await
                        .map_err(|e| Error::io("connect", e))?
                }
                None => TcpStream::connect(address)
                    .await
                    .map_err(|e| Error::io("connect", e))?,
            };
            let _ = tcp.set_nodelay(true);
            let (mut socket, _) =
                tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await?;
            // The welcome frame, read here so that nothing is left in
            // tungstenite's buffer when a reader takes the bare stream.
            match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => Ok::<Socket, Error>(socket),
                _ => Err(Error::Input(format!("no welcome frame from {address}"))),
            }
        }
    });
    stream::iter(attempts)
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}
