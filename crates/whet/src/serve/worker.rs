//! The one thread that runs the models, and the bounded queue in front of it: requests wait
//! their turn instead of running concurrently on the same cores.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use tokio::sync::mpsc;
use whet_model::{Finish, GenerationConfig, Model};
use whet_tokenize::Tokenizer;

use crate::stream::TextStream;

/// A generation request, its prompt already tokenized and checked.
pub struct Job {
    /// Index into the worker's models (0: the base).
    pub model: usize,
    pub prompt: Vec<u32>,
    pub cfg: GenerationConfig,
    pub stops: Vec<String>,
    /// Where the text goes as it is generated; dropping the receiver cancels the job.
    pub events: mpsc::UnboundedSender<Event>,
}

#[derive(Debug)]
pub enum Event {
    Text(String),
    Done {
        finish: &'static str,
        completion_tokens: usize,
    },
    Failed(String),
}

enum Work {
    Generate(Job),
    /// Blocks the worker until the sender is dropped, then frees its slot and acknowledges.
    Hold(std_mpsc::Receiver<()>, std_mpsc::Sender<()>),
}

/// Counts a request from admission until the worker is done with it.
struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// `limit` requests are already waiting or running.
    Full { limit: usize },
    /// The worker has stopped.
    Closed,
}

/// The sending side of the worker's queue. At most `waiting + 1` requests are admitted at a
/// time (one running, `waiting` queued); more are refused at once, not queued.
#[derive(Clone)]
pub struct Queue {
    tx: std_mpsc::Sender<(Work, Ticket)>,
    admitted: Arc<AtomicUsize>,
    limit: usize,
}

/// Holds the worker (and a queue slot) until dropped: see [`Queue::hold`]. The drop returns
/// once the slot is free again.
pub struct Hold {
    release: Option<std_mpsc::Sender<()>>,
    freed: std_mpsc::Receiver<()>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release = None;
        let _ = self.freed.recv();
    }
}

impl Queue {
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        self.send(Work::Generate(job))
    }

    /// Occupies the worker and one queue slot until the returned guard drops (maintenance,
    /// and the tests of a full queue).
    pub fn hold(&self) -> Result<Hold, Refused> {
        let (release, hold) = std_mpsc::channel();
        let (ack, freed) = std_mpsc::channel();
        self.send(Work::Hold(hold, ack))?;
        Ok(Hold {
            release: Some(release),
            freed,
        })
    }

    fn send(&self, work: Work) -> Result<(), Refused> {
        let limit = self.limit;
        self.admitted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|_| Refused::Full { limit })?;
        let ticket = Ticket(self.admitted.clone());
        self.tx.send((work, ticket)).map_err(|_| Refused::Closed)
    }
}

/// Starts the worker thread over `models` (index 0 the base); `waiting` bounds the queue.
pub fn spawn(
    models: Vec<Model>,
    tok: Arc<Tokenizer>,
    waiting: usize,
) -> std::io::Result<(Queue, JoinHandle<()>)> {
    let (tx, rx) = std_mpsc::channel::<(Work, Ticket)>();
    let handle = std::thread::Builder::new()
        .name("whet-serve-worker".into())
        .spawn(move || {
            // Runs until every Queue (the server's state) is dropped.
            for (work, ticket) in rx {
                match work {
                    Work::Generate(job) => {
                        let events = job.events.clone();
                        let last = run(&models, &tok, job);
                        // The slot is free before the client hears the end: a client that
                        // sends its next request at once finds it free.
                        drop(ticket);
                        if let Some(last) = last {
                            let _ = events.send(last);
                        }
                    }
                    Work::Hold(hold, ack) => {
                        let _ = hold.recv();
                        drop(ticket);
                        let _ = ack.send(());
                    }
                }
            }
        })?;
    let queue = Queue {
        tx,
        admitted: Arc::new(AtomicUsize::new(0)),
        limit: waiting.saturating_add(1),
    };
    Ok((queue, handle))
}

/// Runs one job, sending its text as it comes; returns the last event (`Done` or `Failed`),
/// or `None` when the client left.
fn run(models: &[Model], tok: &Tokenizer, job: Job) -> Option<Event> {
    if job.events.is_closed() {
        return None; // the client left while the job waited
    }
    let events = &job.events;
    let mut stream = TextStream::new(tok, &job.stops);
    let mut tokens = 0;
    let mut stopped = false;
    let mut failed = None;
    let result = whet_model::generate_stream(&models[job.model], &job.prompt, &job.cfg, |id| {
        tokens += 1;
        match stream.push(id) {
            Ok(piece) => {
                if !piece.text.is_empty() && events.send(Event::Text(piece.text)).is_err() {
                    return ControlFlow::Break(()); // the client left
                }
                stopped = piece.stop;
                if stopped {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            }
            Err(e) => {
                failed = Some(format!("{e:#}"));
                ControlFlow::Break(())
            }
        }
    });
    let finish = match (result, failed) {
        (_, Some(e)) => return Some(Event::Failed(e)),
        (Err(e), None) => return Some(Event::Failed(e.to_string())),
        (Ok(Finish::Stop), _) => "stop",
        (Ok(Finish::Length), _) => "length",
        (Ok(Finish::Halted), _) if stopped => "stop",
        (Ok(Finish::Halted), _) => return None,
    };
    match stream.finish() {
        Ok(rest) if !rest.is_empty() => {
            let _ = events.send(Event::Text(rest));
        }
        Ok(_) => {}
        Err(e) => return Some(Event::Failed(format!("{e:#}"))),
    }
    Some(Event::Done {
        finish,
        completion_tokens: tokens,
    })
}
