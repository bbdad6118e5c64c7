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

/// The `Failed` event of a trainer thread that panicked: a bug, but the user's files are safe (every save is
/// atomic), and the front ends must show it as the failure it is.
fn crashed(panic: &(dyn std::any::Any + Send)) -> Event {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    Event::Failed {
        message: format!("lora-studio stopped on an internal error: {what}"),
        hint: "This is a bug in lora-studio; please report it with the log. Saved LoRA files and the last saved \
               state in the output folder are intact: resume from that state, or start again."
            .into(),
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
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    super::run::run(config, options, &link)
                }));
                if let Err(panic) = ran {
                    link.emit(crashed(panic.as_ref()));
                }
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_failure_with_its_message() {
        let panic = std::panic::catch_unwind(|| panic!("index {} out of range", 3)).unwrap_err();
        match crashed(panic.as_ref()) {
            Event::Failed { message, hint } => {
                assert!(message.ends_with("index 3 out of range"), "{message}");
                assert!(hint.contains("intact"), "{hint}");
            }
            other => panic!("{other:?}"),
        }
    }
}
