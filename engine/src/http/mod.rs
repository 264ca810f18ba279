//! The HTTP listener (`engine.http_listen`, off when absent): `GET /metrics` in Prometheus's
//! text format. It reads what `lbctl status` and `lbctl stats` read, through the control side;
//! nothing new touches the workers. Read-only: it changes nothing, so it asks nobody who they
//! are (put it on a loopback or management address).

pub mod metrics;

use crate::control::Control;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the listener looks at the stop flag while no request comes.
const POLL: Duration = Duration::from_millis(200);

/// Why the listener did not start.
#[derive(Debug, thiserror::Error)]
#[error("listening for HTTP on {address}: {reason}")]
pub struct HttpError {
    /// Where.
    pub address: SocketAddr,
    /// What the system said.
    pub reason: String,
}

/// Listens on `address` until `stop` is set; one thread answers the requests in turn (a scrape
/// takes milliseconds).
pub fn start(
    address: SocketAddr,
    control: Arc<Mutex<Control>>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, HttpError> {
    let server = tiny_http::Server::http(address).map_err(|e| HttpError {
        address,
        reason: e.to_string(),
    })?;
    tracing::info!(%address, "HTTP listener ready (/metrics)");
    std::thread::Builder::new()
        .name("lbd-http".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match server.recv_timeout(POLL) {
                    Ok(Some(request)) => answer(request, &control),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(%error, "HTTP listener");
                        std::thread::sleep(POLL);
                    }
                }
            }
        })
        .map_err(|e| HttpError {
            address,
            reason: e.to_string(),
        })
}

fn answer(request: tiny_http::Request, control: &Mutex<Control>) {
    use tiny_http::{Header, Method, Response};
    let path = request.url().split('?').next().unwrap_or_default();
    let response = match (request.method(), path) {
        (Method::Get, "/metrics") => {
            let text = match control.lock() {
                Ok(control) => metrics::render(&control.status(), &control.stats())
                    .map_err(|error| error.to_string()),
                Err(_) => Err("the control side is gone".to_owned()),
            };
            match text {
                Ok(text) => {
                    let response = Response::from_string(text);
                    match Header::from_bytes("Content-Type", metrics::content_type()) {
                        Ok(header) => response.with_header(header),
                        Err(()) => response,
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "cannot render /metrics");
                    Response::from_string(format!("{error}\n")).with_status_code(500)
                }
            }
        }
        (Method::Get, _) => Response::from_string("not found\n").with_status_code(404),
        _ => Response::from_string("method not allowed\n").with_status_code(405),
    };
    // The client may have gone; nothing to do then.
    let _ = request.respond(response);
}
