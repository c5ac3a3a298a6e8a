//! A TCP proxy that can cut a link: a partition, not a refusal.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// A TCP proxy in front of `target` that can be cut. While cut, every connection goes
/// silent (bytes are neither forwarded nor answered, like a partition, not a refusal) and new
/// connections are accepted but never answered; on heal those connections are closed, so the
/// client reconnects through a working path.
#[derive(Debug)]
pub struct Proxy {
    pub addr: String,
    cut: watch::Sender<bool>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let (cut, _) = watch::channel(false);
        let target = target.to_owned();
        let cut_rx = cut.subscribe();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(pump(client, target.clone(), cut_rx.clone()));
            }
        })
        .abort_handle();
        Proxy { addr, cut, accept }
    }

    pub fn blackhole(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Closes every held connection.
        self.cut.send_replace(false);
    }
}

async fn pump(mut client: TcpStream, target: String, mut cut: watch::Receiver<bool>) {
    if *cut.borrow_and_update() {
        let _ = cut.wait_for(|c| !*c).await;
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(&target).await else {
        return;
    };
    let mut a = vec![0u8; 16 * 1024];
    let mut b = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            biased;
            changed = cut.changed() => {
                if changed.is_err() {
                    return;
                }
                if *cut.borrow_and_update() {
                    // Silent until healed, then closed.
                    let _ = cut.wait_for(|c| !*c).await;
                    return;
                }
            }
            n = client.read(&mut a) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if upstream.write_all(&a[..n]).await.is_err() { return },
            },
            n = upstream.read(&mut b) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if client.write_all(&b[..n]).await.is_err() { return },
            },
        }
    }
}
