//! The training engine's thread: owns every candle object of a run, takes `Command`s and reports `Event`s over
//! crossbeam channels. The GUI and the CLI both drive a run through an [`Engine`].

use super::config::TrainConfig;
use super::events::{Command, Event};
use crossbeam_channel::{Receiver, Sender};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

/// How a run starts.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Continue from this training-state folder (`OUTPUT/state`).
    pub resume: Option<PathBuf>,
    /// Stop (saving, as the Stop command does) after this many steps of this run.
    pub stop_after: Option<u64>,
}

/// Called after every event is sent (the GUI passes `ctx.request_repaint`).
pub type Notify = Arc<dyn Fn() + Send + Sync>;

/// A running (or finished) training run.
pub struct Engine {
    commands: Sender<Command>,
    events: Receiver<Event>,
    thread: Option<JoinHandle<()>>,
}

/// The engine side of the channels.
pub struct Link {
    commands: Receiver<Command>,
    events: Sender<Event>,
    notify: Notify,
}

impl Link {
    pub fn emit(&self, event: Event) {
        // A front end that went away no longer listens; the run goes on to its next save point regardless.
        let _ = self.events.send(event);
        (self.notify)();
    }

    /// The next waiting command, if any.
    pub fn try_command(&self) -> Option<Command> {
        self.commands.try_recv().ok()
    }

    /// Waits for a command (while paused). `None` once every front end has gone.
    pub fn wait_command(&self) -> Option<Command> {
        self.commands.recv().ok()
    }
}

impl Engine {
    /// Starts a run of `config` on its own thread.
    pub fn start(config: TrainConfig, options: StartOptions, notify: Notify) -> Engine {
        let (command_tx, command_rx) = crossbeam_channel::unbounded();
        let (event_tx, event_rx) = crossbeam_channel::unbounded();
        let link = Link {
            commands: command_rx,
            events: event_tx,
            notify,
        };
        let thread = std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || super::run::run(config, options, &link))
            .expect("the trainer thread starts");
        Engine {
            commands: command_tx,
            events: event_rx,
            thread: Some(thread),
        }
    }

    pub fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// The event stream; ends (disconnects) after the terminal event.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// True once the trainer thread has ended.
    pub fn is_done(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the thread to end.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
