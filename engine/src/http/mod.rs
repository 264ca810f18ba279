//! The HTTP listener (`engine.http_listen`, off when absent):
//!
//! - `GET /metrics`: Prometheus's text format ([`metrics`]).
//! - `GET /`: the System Overview page ([`page`]), which refreshes itself every second from
//!   `GET /api/status` (the JSON `lbctl --json status` prints) and draws each service's and real
//!   server's packets per second over the last 15 minutes from `GET /api/history`, which lbd
//!   keeps in memory (one sample a second).
//! - `POST /api/action`: drain, halt or online a real server, only with `http_actions` and the
//!   token of `http_token_file` (compared in constant time), with an operator's rights; anything
//!   else is refused with 403, and every action is logged with its source address.
//!
//! Everything reads what `lbctl status` and `lbctl stats` read, through the control side;
//! nothing new touches the workers.

pub mod history;
pub mod metrics;
pub mod page;

use crate::control::{Control, Role};
use history::History;
use lbd_proto::{Command, RealServerName, Reply};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the listener looks at the stop flag while no request comes.
const POLL: Duration = Duration::from_millis(200);
/// The largest action request read.
const MAX_ACTION_BYTES: u64 = 4096;

/// Why the listener did not start.
#[derive(Debug, thiserror::Error)]
#[error("HTTP listener on {address}: {reason}")]
pub struct HttpError {
    /// Where.
    pub address: SocketAddr,
    /// What went wrong.
    pub reason: String,
}

/// What the listener serves with.
struct Site {
    control: Arc<Mutex<Control>>,
    history: Mutex<History>,
    /// The actions' token, when actions are on.
    token: Option<Vec<u8>>,
}

/// Listens on `address` until `stop` is set; one thread answers the requests in turn (each
/// takes milliseconds) and samples the traffic once a second for the page's graphs. With
/// `token_file`, the page's actions are on.
pub fn start(
    address: SocketAddr,
    token_file: Option<&std::path::Path>,
    control: Arc<Mutex<Control>>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, HttpError> {
    let fail = |reason: String| HttpError { address, reason };
    let token = token_file
        .map(|path| {
            crate::io::host::read_secret(path, 16).map_err(|reason| {
                fail(format!(
                    "engine.http_token_file {}: {reason}",
                    path.display()
                ))
            })
        })
        .transpose()?;
    let server = tiny_http::Server::http(address).map_err(|e| fail(e.to_string()))?;
    tracing::info!(%address, actions = token.is_some(), "HTTP listener ready (/, /metrics)");
    let site = Site {
        control,
        history: Mutex::new(History::default()),
        token,
    };
    std::thread::Builder::new()
        .name("lbd-http".into())
        .spawn(move || {
            let mut next_sample = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= next_sample {
                    next_sample += history::INTERVAL;
                    site.sample();
                }
                let wait = next_sample
                    .saturating_duration_since(Instant::now())
                    .min(POLL);
                match server.recv_timeout(wait) {
                    Ok(Some(request)) => site.answer(request),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(%error, "HTTP listener");
                        std::thread::sleep(POLL);
                    }
                }
            }
        })
        .map_err(|e| fail(e.to_string()))
}

type HttpResponse = tiny_http::Response<std::io::Cursor<Vec<u8>>>;

/// A response with its media type.
fn respond(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> HttpResponse {
    let response = tiny_http::Response::from_data(body.into()).with_status_code(status);
    match tiny_http::Header::from_bytes("Content-Type", content_type) {
        Ok(header) => response.with_header(header),
        Err(()) => response,
    }
}

fn text(status: u16, body: &str) -> HttpResponse {
    respond(status, "text/plain; charset=utf-8", format!("{body}\n"))
}

fn json(value: &impl serde::Serialize) -> HttpResponse {
    match serde_json::to_vec(value) {
        Ok(body) => respond(200, "application/json", body),
        Err(error) => text(500, &error.to_string()),
    }
}

impl Site {
    /// One traffic sample for the graphs.
    fn sample(&self) {
        let stats = match self.control.lock() {
            Ok(control) => control.stats(),
            Err(_) => return,
        };
        if let Ok(mut history) = self.history.lock() {
            history.record(&stats);
        }
    }

    fn answer(&self, mut request: tiny_http::Request) {
        use tiny_http::Method;
        let path = request
            .url()
            .split('?')
            .next()
            .unwrap_or_default()
            .to_owned();
        let response = match (request.method(), path.as_str()) {
            (Method::Get, "/") => respond(200, "text/html; charset=utf-8", page::HTML),
            (Method::Get, "/metrics") => self.metrics(),
            (Method::Get, "/api/status") => match self.control.lock() {
                Ok(control) => json(&Reply::Status(control.status())),
                Err(_) => text(500, "the control side is gone"),
            },
            (Method::Get, "/api/history") => match self.history.lock() {
                Ok(history) => json(&history.report()),
                Err(_) => text(500, "no history"),
            },
            (Method::Get, "/api/page") => json(&serde_json::json!({
                "actions": self.token.is_some(),
            })),
            (Method::Post, "/api/action") => self.action(&mut request),
            (Method::Get, _) => text(404, "not found"),
            _ => text(405, "method not allowed"),
        };
        // The client may have gone; nothing to do then.
        let _ = request.respond(response);
    }

    fn metrics(&self) -> HttpResponse {
        let rendered = match self.control.lock() {
            Ok(control) => {
                metrics::render(&control.status(), &control.stats()).map_err(|e| e.to_string())
            }
            Err(_) => Err("the control side is gone".to_owned()),
        };
        match rendered {
            Ok(body) => respond(200, metrics::content_type(), body),
            Err(error) => {
                tracing::error!(%error, "cannot render /metrics");
                text(500, &error)
            }
        }
    }

    /// A page action: with the token, drain, halt or online a real server as an operator may.
    fn action(&self, request: &mut tiny_http::Request) -> HttpResponse {
        let source = request
            .remote_addr()
            .map(ToString::to_string)
            .unwrap_or_default();
        let Some(token) = &self.token else {
            tracing::warn!(%source, "HTTP action refused: actions are off");
            return text(403, "actions are off (engine.http_actions)");
        };
        let offered = request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Authorization"))
            .and_then(|h| h.value.as_str().strip_prefix("Bearer "))
            .unwrap_or_default()
            .as_bytes()
            .to_vec();
        if !page::same_token(&offered, token) {
            tracing::warn!(%source, "HTTP action refused: wrong or missing token");
            return text(403, "wrong or missing token");
        }
        let mut body = String::new();
        let read = std::io::Read::read_to_string(
            &mut std::io::Read::take(request.as_reader(), MAX_ACTION_BYTES),
            &mut body,
        );
        let parsed: Result<page::Action, String> = read
            .map_err(|e| e.to_string())
            .and_then(|_| serde_json::from_str(&body).map_err(|e| e.to_string()));
        let action = match parsed {
            Ok(action) => action,
            Err(error) => return text(400, &format!("a bad action: {error}")),
        };
        let name = RealServerName {
            service: action.service.clone(),
            label: action.real_server.clone(),
        };
        let command = match action.action.as_str() {
            "drain" => Command::Drain(name),
            "halt" => Command::Halt(name),
            "online" => Command::Online(name),
            other => {
                return text(
                    400,
                    &format!("unknown action {other:?}: drain, halt or online"),
                );
            }
        };
        tracing::info!(%source, action = %action.action, service = %action.service, real_server = %action.real_server, "HTTP action");
        match self.control.lock() {
            Ok(mut control) => json(&control.handle(command, Role::Operator)),
            Err(_) => text(500, "the control side is gone"),
        }
    }
}
