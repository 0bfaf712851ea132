//! Real local servers for the channel tests: an HTTP server that records every request and
//! answers by path, and a minimal SMTP server that records every transaction.
#![allow(dead_code)] // each test binary uses part of this
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use canvas_channels::{Channels, ChannelsConfig, Message, MessageKind};
use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// The fixed time of every test attempt: 2030-01-02T03:04:05Z.
pub fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap()
}

/// A message as the daemon would build it from an outbox row.
pub fn message(address: Option<&str>, payload: Json) -> Message {
    Message {
        key: "run-7/step-birthday".into(),
        kind: MessageKind::Message,
        flow: "birthday".into(),
        step: "step-birthday".into(),
        customer_id: "c-42".into(),
        address: address.map(str::to_owned),
        template: Some("birthday_gift".into()),
        payload,
        now: now(),
    }
}

/// A `call` row for webhook `name`.
pub fn call(name: &str, body: Json) -> Message {
    Message {
        key: "run-7/step-crm".into(),
        kind: MessageKind::Call,
        flow: "birthday".into(),
        step: "step-crm".into(),
        customer_id: "c-42".into(),
        address: None,
        template: None,
        payload: json!({ "webhook": name, "body": body, "save_as": "crm" }),
        now: now(),
    }
}

/// Parse a `channels:` section and build it with the given environment.
pub fn channels(yaml: &str, env: &[(&str, &str)]) -> Channels {
    let config: ChannelsConfig = serde_yaml_ng::from_str(yaml).expect("valid channels yaml");
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let resolved = config
        .resolve(|k| env.get(k).cloned())
        .expect("secrets resolve");
    Channels::from_config(resolved).expect("channels build")
}

/// A port with nothing listening on it.
pub async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

// ---------------------------------------------------------------------------------------
// HTTP

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

type Log = Arc<Mutex<Vec<Recorded>>>;

/// An HTTP server on 127.0.0.1 that records requests and answers by path:
/// `/ok` 200 JSON echo, `/empty` 204, `/text` 200 text, `/fail` 500, `/busy` 429 with
/// `Retry-After: 7`, `/bad` 400 JSON error, `/hang` sleeps 30 s.
pub struct HttpServer {
    pub addr: SocketAddr,
    log: Log,
}

impl HttpServer {
    pub async fn start() -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Log = Arc::default();
        let app = axum::Router::new().fallback(answer).with_state(log.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        HttpServer { addr, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }
}

async fn answer(
    State(log): State<Log>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
    log.lock().unwrap().push(Recorded {
        method,
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        headers,
        body: body.to_vec(),
    });
    match uri.path() {
        "/ok" => axum::Json(json!({ "ok": true, "id": "prov-123", "received": received }))
            .into_response(),
        "/empty" => StatusCode::NO_CONTENT.into_response(),
        "/text" => "accepted".into_response(),
        "/fail" => (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response(),
        "/busy" => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "7")],
            "slow down",
        )
            .into_response(),
        "/bad" => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "error": "invalid mobile number" })),
        )
            .into_response(),
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::OK.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

// ---------------------------------------------------------------------------------------
// SMTP

/// One SMTP transaction the server accepted (or refused at DATA).
#[derive(Debug, Clone, Default)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
}

/// What the SMTP server answers.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    /// Accept everything.
    Accept,
    /// Answer RCPT TO with this line (e.g. `450 4.2.1 Mailbox busy`).
    RejectRcpt(&'static str),
    /// Answer the end of DATA with this line.
    RejectData(&'static str),
}

/// A minimal SMTP server (EHLO/HELO, AUTH PLAIN, MAIL, RCPT, DATA, RSET, NOOP, QUIT) on
/// 127.0.0.1, plain text.
pub struct SmtpServer {
    pub addr: SocketAddr,
    mails: Arc<Mutex<Vec<Mail>>>,
    commands: Arc<Mutex<Vec<String>>>,
}

impl SmtpServer {
    pub async fn start(reply: Reply) -> SmtpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mails: Arc<Mutex<Vec<Mail>>> = Arc::default();
        let commands: Arc<Mutex<Vec<String>>> = Arc::default();
        let (m, c) = (mails.clone(), commands.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(session(stream, reply, m.clone(), c.clone()));
            }
        });
        SmtpServer {
            addr,
            mails,
            commands,
        }
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }

    pub fn commands(&self) -> Vec<String> {
        self.commands.lock().unwrap().clone()
    }
}

async fn session(
    stream: tokio::net::TcpStream,
    reply: Reply,
    mails: Arc<Mutex<Vec<Mail>>>,
    commands: Arc<Mutex<Vec<String>>>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    macro_rules! say {
        ($($t:tt)*) => {
            if write.write_all(format!($($t)*).as_bytes()).await.is_err() {
                return;
            }
        };
    }
    say!("220 test.local ESMTP ready\r\n");
    let mut mail = Mail::default();
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let cmd = line.trim_end().to_owned();
        commands.lock().unwrap().push(cmd.clone());
        let verb = cmd
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => say!("250-test.local\r\n250-8BITMIME\r\n250 AUTH PLAIN\r\n"),
            "HELO" => say!("250 test.local\r\n"),
            "AUTH" => say!("235 2.7.0 Authentication successful\r\n"),
            "MAIL" => {
                mail = Mail {
                    from: cmd[10..].to_owned(),
                    ..Mail::default()
                };
                say!("250 2.1.0 Ok\r\n");
            }
            "RCPT" => match reply {
                Reply::RejectRcpt(r) => say!("{r}\r\n"),
                _ => {
                    mail.to.push(cmd[8..].to_owned());
                    say!("250 2.1.5 Ok\r\n");
                }
            },
            "DATA" => {
                say!("354 End data with <CR><LF>.<CR><LF>\r\n");
                let mut data = String::new();
                loop {
                    line.clear();
                    match lines.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    // Undo dot-stuffing.
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                mail.data = data;
                let done = std::mem::take(&mut mail);
                match reply {
                    Reply::RejectData(r) => say!("{r}\r\n"),
                    _ => {
                        mails.lock().unwrap().push(done);
                        say!("250 2.0.0 Ok: queued as Q1\r\n");
                    }
                }
            }
            "RSET" => {
                mail = Mail::default();
                say!("250 2.0.0 Ok\r\n");
            }
            "NOOP" => say!("250 2.0.0 Ok\r\n"),
            "QUIT" => {
                say!("221 2.0.0 Bye\r\n");
                return;
            }
            _ => say!("502 5.5.2 Command not recognized\r\n"),
        }
    }
}

/// Message or part headers: lower-case name → value.
pub type Headers = HashMap<String, String>;

/// The parts of a multipart body: (headers, body) each, split on the boundary in
/// `Content-Type`. Header names are lower-cased, folded lines joined.
pub fn mime_parts(data: &str) -> (Headers, Vec<(Headers, String)>) {
    let (head, body) = split_head(data);
    let content_type = head.get("content-type").cloned().unwrap_or_default();
    let Some(b) = content_type.split("boundary=").nth(1) else {
        return (head, vec![]);
    };
    let boundary = format!("--{}", b.trim_matches('"'));
    let parts = body
        .split(&boundary)
        .skip(1)
        .filter(|p| !p.starts_with("--"))
        .map(|p| {
            let (h, b) = split_head(p.trim_start_matches("\r\n"));
            (h, b.trim_end_matches("\r\n").to_owned())
        })
        .collect();
    (head, parts)
}

/// Split a message into its headers (lower-case names, unfolded) and body.
pub fn split_head(data: &str) -> (HashMap<String, String>, String) {
    let (head, body) = data.split_once("\r\n\r\n").unwrap_or((data, ""));
    let mut headers: HashMap<String, String> = HashMap::new();
    let mut last: Option<String> = None;
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(k) = &last {
                let v = headers.get_mut(k).unwrap();
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            headers.insert(k.clone(), v.trim().to_owned());
            last = Some(k);
        }
    }
    (headers, body.to_owned())
}

/// A MIME part's body with its `Content-Transfer-Encoding` undone (7bit, 8bit or
/// quoted-printable; what lettre picks for text).
pub fn decoded(headers: &HashMap<String, String>, body: &str) -> String {
    let cte = headers
        .get("content-transfer-encoding")
        .map(|s| s.to_ascii_lowercase())
        .unwrap_or_default();
    if cte != "quoted-printable" {
        return body.to_owned();
    }
    let joined = body.replace("=\r\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).expect("QP escape"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("UTF-8 body")
}
