//! `whet serve` end to end over loopback: the server in-process on 127.0.0.1:0, requests with
//! an HTTP client (ureq), answers checked against in-process greedy generation.

use serde_json::{Value, json};
use whet::cli::ModelArgs;
use whet::prompt::{chat_ids, complete, prompt_ids, stop_tokens};
use whet::runtime::{Runtime, load_tokenizer};
use whet::serve::{ServeOptions, Server};
use whet_data::{Message, Role};
use whet_model::{GenerationConfig, Model, Trainable};
use whet_tokenize::Tokenizer;

use crate::common::*;

/// (status, body) of a request; error statuses too.
fn call(req: ureq::Request, body: Option<&str>) -> (u16, String) {
    let r = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    }
}

fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (code, text) = post_raw(server, path, &body.to_string());
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (code, v)
}

fn post_raw(server: &Server, path: &str, body: &str) -> (u16, String) {
    call(
        ureq::post(&format!("http://{}{path}", server.addr())),
        Some(body),
    )
}

/// The `data:` payloads of a server-sent event stream; asserts it ends with `[DONE]`.
fn sse(server: &Server, path: &str, body: &Value) -> Vec<Value> {
    let (code, text) = post_raw(server, path, &body.to_string());
    assert_eq!(code, 200, "{text}");
    let data: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
        })
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// Asserts OpenAI's error body and returns it.
#[track_caller]
fn error(code: u16, body: &Value, want_code: u16) -> &serde_json::Map<String, Value> {
    assert_eq!(code, want_code, "{body}");
    let e = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{body}"));
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    e
}

struct Fixture {
    _tmp: Tmp,
    tok: Tokenizer,
    base: Model,
    tuned: Model,
    dir: std::path::PathBuf,
}

fn fixture_models(name: &str) -> Fixture {
    let tmp = Tmp::new(name);
    let (m, out) = trained_chat_run(&tmp);
    let rt = Runtime::new("cpu", "auto", "auto").unwrap();
    let args = ModelArgs {
        model: m.clone(),
        adapter: None,
        chat_template: None,
    };
    let base = rt.load_model(&args, Trainable::None).unwrap();
    let tuned = rt.with_adapter(&base, &out.join("adapter")).unwrap();
    Fixture {
        tok: load_tokenizer(&m).unwrap(),
        _tmp: tmp,
        base,
        tuned,
        dir: m,
    }
}

fn start(f: &Fixture, queue: usize) -> Server {
    let opts = ServeOptions {
        host: "127.0.0.1".into(),
        port: 0,
        queue,
        default_max_tokens: 16,
    };
    Server::start(
        vec![
            ("tiny".into(), f.base.clone()),
            ("support".into(), f.tuned.clone()),
        ],
        load_tokenizer(&f.dir).unwrap(),
        &opts,
    )
    .unwrap()
}

fn greedy(f: &Fixture, model: &Model, ids: &[u32], n: usize) -> String {
    let mut cfg = GenerationConfig::greedy(n);
    cfg.eos_token_ids = Some(stop_tokens(model, &f.tok));
    complete(model, &f.tok, ids, &cfg).unwrap()
}

#[test]
fn serve_answers_openai_requests_streamed_and_whole_for_each_adapter() {
    let f = fixture_models("serve");
    let server = start(&f, 8);
    let hi = [Message {
        role: Role::User,
        content: "Hi".into(),
    }];
    let hi_ids = chat_ids(&f.tok, &hi).unwrap();

    // /v1/models: the base and the adapter.
    let (code, text) = call(
        ureq::get(&format!("http://{}/v1/models", server.addr())),
        None,
    );
    assert_eq!(code, 200);
    let models: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["object"], "model");
            m["id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(ids, ["tiny", "support"]);

    // A whole chat completion: OpenAI's shape, the greedy answer of each model.
    let request = |model: &str| {
        json!({ "model": model, "messages": [{ "role": "user", "content": "Hi" }],
                "temperature": 0, "max_tokens": 8 })
    };
    let mut answers = Vec::new();
    for (name, model) in [("tiny", &f.base), ("support", &f.tuned)] {
        let (code, body) = post(&server, "/v1/chat/completions", &request(name));
        assert_eq!(code, 200, "{body}");
        assert!(
            body["id"].as_str().unwrap().starts_with("chatcmpl-"),
            "{body}"
        );
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], name);
        assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
        let choice = &body["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["message"]["role"], "assistant");
        let content = choice["message"]["content"].as_str().unwrap().to_string();
        assert_eq!(content, greedy(&f, model, &hi_ids, 8), "{name}");
        let finish = choice["finish_reason"].as_str().unwrap();
        assert!(["stop", "length"].contains(&finish), "{body}");
        let usage = &body["usage"];
        assert_eq!(usage["prompt_tokens"], hi_ids.len());
        let completion = usage["completion_tokens"].as_u64().unwrap();
        assert!((1..=8).contains(&completion), "{body}");
        assert_eq!(usage["total_tokens"], hi_ids.len() as u64 + completion);

        // Streamed: a role chunk, content deltas that add up to the same answer, a finish.
        let mut streamed = request(name);
        streamed["stream"] = json!(true);
        let chunks = sse(&server, "/v1/chat/completions", &streamed);
        assert!(chunks.len() >= 3, "{chunks:?}");
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["id"], chunks[0]["id"]);
            assert_eq!(c["model"], name);
        }
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let deltas: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(deltas, content);
        let last = &chunks.last().unwrap()["choices"][0];
        assert_eq!(last["finish_reason"], finish);
        assert!(
            chunks[..chunks.len() - 1]
                .iter()
                .all(|c| c["choices"][0]["finish_reason"].is_null())
        );
        // With stream_options.include_usage: a last chunk with the usage and no choices.
        streamed["stream_options"] = json!({ "include_usage": true });
        let chunks = sse(&server, "/v1/chat/completions", &streamed);
        let usage_chunk = chunks.last().unwrap();
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"], body["usage"]);
        answers.push(content);
    }
    assert_ne!(answers[0], answers[1], "the adapter changed nothing");

    // A stop string: the answer ends before it.
    let whole = &answers[0];
    let cut = whole
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i > 0 && !whole[i..].trim().is_empty() && !whole[..i].contains(&whole[i..i + 1]))
        .unwrap_or_else(|| panic!("no stop string to pick in {whole:?}"));
    let stop = &whole[cut..cut + 1];
    let mut req = request("tiny");
    req["stop"] = json!([stop]);
    let (code, body) = post(&server, "/v1/chat/completions", &req);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], whole[..cut]);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    // /v1/completions: raw text, whole and streamed.
    let raw_ids = prompt_ids(&f.tok, "The quick brown fox", false, None).unwrap();
    let want = greedy(&f, &f.tuned, &raw_ids, 6);
    let req = json!({ "model": "support", "prompt": "The quick brown fox",
                      "temperature": 0, "max_tokens": 6 });
    let (code, body) = post(&server, "/v1/completions", &req);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], want);
    assert_eq!(body["usage"]["prompt_tokens"], raw_ids.len());
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let chunks = sse(&server, "/v1/completions", &streamed);
    let text: String = chunks
        .iter()
        .map(|c| {
            assert_eq!(c["object"], "text_completion");
            c["choices"][0]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, want);
    assert!(!chunks.last().unwrap()["choices"][0]["finish_reason"].is_null());

    // Several clients at once: queued, each answered in full.
    let base_answer = answers[0].clone();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| post(&server, "/v1/chat/completions", &request("tiny"))))
            .collect();
        for h in handles {
            let (code, body) = h.join().unwrap();
            assert_eq!(code, 200, "{body}");
            assert_eq!(body["choices"][0]["message"]["content"], base_answer);
        }
    });

    // Sampling is seeded: the same seed gives the same answer.
    let mut sampled = request("tiny");
    sampled["temperature"] = json!(1.0);
    sampled["seed"] = json!(7);
    let (_, a) = post(&server, "/v1/chat/completions", &sampled);
    let (_, b) = post(&server, "/v1/chat/completions", &sampled);
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
}

#[test]
fn serve_answers_bad_requests_and_a_full_queue_with_openai_errors() {
    let f = fixture_models("serve-errors");
    let server = start(&f, 0);
    let ok = json!({ "model": "tiny", "messages": [{ "role": "user", "content": "Hi" }],
                     "temperature": 0, "max_tokens": 2 });

    let mut unknown = ok.clone();
    unknown["model"] = json!("gpt-4");
    let (code, body) = post(&server, "/v1/chat/completions", &unknown);
    let e = error(code, &body, 404);
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );
    assert!(e["message"].as_str().unwrap().contains("gpt-4"), "{body}");

    let (code, text) = post_raw(&server, "/v1/chat/completions", "{\"model\": \"tiny\", ");
    let body: Value = serde_json::from_str(&text).unwrap();
    let e = error(code, &body, 400);
    assert_eq!(e["type"], "invalid_request_error");

    let (code, body) = post(&server, "/v1/chat/completions", &json!({ "model": "tiny" }));
    assert!(
        error(code, &body, 400)["message"]
            .as_str()
            .unwrap()
            .contains("messages")
    );

    let mut two = ok.clone();
    two["n"] = json!(2);
    let (code, body) = post(&server, "/v1/chat/completions", &two);
    assert_eq!(error(code, &body, 400)["param"], "n");

    let mut hot = ok.clone();
    hot["temperature"] = json!(-1);
    let (code, body) = post(&server, "/v1/chat/completions", &hot);
    assert_eq!(error(code, &body, 400)["param"], "temperature");

    let mut role = ok.clone();
    role["messages"] = json!([{ "role": "wizard", "content": "Hi" }]);
    let (code, body) = post(&server, "/v1/chat/completions", &role);
    assert_eq!(error(code, &body, 400)["param"], "messages");

    let long = "word ".repeat(400);
    let (code, body) = post(
        &server,
        "/v1/completions",
        &json!({ "model": "tiny", "prompt": long, "max_tokens": 2 }),
    );
    assert_eq!(error(code, &body, 400)["code"], "context_length_exceeded");

    // A body over axum's 2 MiB limit: 413, OpenAI's body. The server answers once it has
    // read 2 MiB and closes, so the body is sent from another thread that may fail to finish.
    {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(server.addr()).unwrap();
        let mut writer = tcp.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let body = vec![b'a'; 3 << 20];
            let _ = write!(
                writer,
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = writer.write_all(&body);
        });
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        // The answer, up to the end of its JSON body.
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        let body = loop {
            let n = tcp.read(&mut buf).unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&reply));
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply).into_owned();
            if let Some(at) = text.find("\r\n\r\n")
                && let Ok(v) = serde_json::from_str::<Value>(&text[at + 4..])
            {
                assert!(text.starts_with("HTTP/1.1 413"), "{text}");
                break v;
            }
        };
        error(413, &body, 413);
        drop(tcp);
        sender.join().unwrap();
    }

    let (code, text) = call(
        ureq::get(&format!("http://{}/v1/nothing", server.addr())),
        None,
    );
    error(code, &serde_json::from_str(&text).unwrap(), 404);

    // --queue 0: while the worker is busy, a request is refused at once with 429...
    let hold = server.hold_worker().expect("an idle server");
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let mut req = ok.clone();
        if path == "/v1/completions" {
            req = json!({ "model": "tiny", "prompt": "Hi", "max_tokens": 2 });
        }
        let (code, body) = post(&server, path, &req);
        let e = error(code, &body, 429);
        assert_eq!(e["code"], "queue_full", "{body}");
    }
    // ...and served again once it is free.
    drop(hold);
    let (code, body) = post(&server, "/v1/chat/completions", &ok);
    assert_eq!(code, 200, "{body}");
}

/// Kills the child process when dropped (a failed assertion leaves no server behind).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn whet_serve_binary_serves_the_base_by_folder_name_and_each_named_adapter() {
    use std::io::BufRead;
    use std::process::Stdio;
    let tmp = Tmp::new("serve-bin");
    let (m, out) = trained_chat_run(&tmp);
    let adapter = format!("support={}", s(&out.join("adapter")));
    let mut child = Child(
        whet_cmd(["serve", "--model", s(&m), "--adapter", &adapter])
            .args(["--port", "0", "--queue", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = std::io::BufReader::new(child.0.stderr.take().unwrap());
    let mut seen = Vec::new();
    let mut addr = None;
    for line in stderr.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("whet serve: http://") {
            addr = rest.split_whitespace().next().map(str::to_string);
            break;
        }
        seen.push(line);
    }
    let addr = addr.unwrap_or_else(|| panic!("no address announced: {seen:?}"));
    let (code, text) = call(ureq::get(&format!("http://{addr}/v1/models")), None);
    assert_eq!(code, 200, "{text}");
    let models: Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["model", "support"]); // the base under its folder's name
    let req = json!({ "model": "support", "messages": [{ "role": "user", "content": "Hi" }],
                      "temperature": 0, "max_tokens": 3 });
    let (code, text) = call(
        ureq::post(&format!("http://{addr}/v1/chat/completions")),
        Some(&req.to_string()),
    );
    assert_eq!(code, 200, "{text}");
    drop(child);

    // A malformed --adapter, and an adapter named like the base, are refused.
    let bad = whet(["serve", "--model", s(&m), "--adapter", "no-name"]);
    assert!(!bad.status.success());
    assert!(bad.stderr.contains("expected NAME=DIR"), "{}", bad.stderr);
    let taken = format!("model={}", s(&out.join("adapter")));
    let r = whet([
        "serve",
        "--model",
        s(&m),
        "--adapter",
        &taken,
        "--port",
        "0",
    ])
    .fails();
    assert!(r.stderr.contains("already taken"), "{}", r.stderr);
}
