//! The `turnpike` binary: the command line ([`cli`]), running a server ([`serve`]) and the operator
//! tools ([`tools`]).

mod admin_client;
mod cli;
mod serve;
mod tools;

use clap::Parser;
use cli::{Cli, Command, ConfigCommand, SessionsCommand};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => match cli.config {
            Some(path) => serve::run(&path),
            // Unreachable: clap prints the help when no argument is given.
            None => Err("nothing to do: see `turnpike --help`".into()),
        },
        Some(Command::Run(c)) => serve::run(&c.config),
        Some(Command::Dev) => serve::dev(),
        Some(Command::Check { config, json }) => tools::check(&config.config, json),
        Some(Command::Reload { config, pid, timeout }) => tools::reload(&config.config, pid, timeout),
        Some(Command::Credentials { secret, user, ttl, uri }) => {
            tools::credentials(&secret, &user, ttl, uri.as_deref())
        }
        Some(Command::SynapseConfig { config, host }) => tools::synapse_config(&config.config, host.as_deref()),
        Some(Command::Probe(args)) => tools::probe(&args),
        Some(Command::Config(ConfigCommand::Convert { file })) => tools::convert(&file),
        Some(Command::Config(ConfigCommand::Reference)) => {
            tools::print(&turnpike::config::options::reference_markdown())
        }
        Some(Command::Sessions(SessionsCommand::List { config, user, fleet, json })) => {
            admin_client::list(&config.config, user.as_deref(), fleet, json)
        }
        Some(Command::Sessions(SessionsCommand::Kill { config, user, id })) => {
            admin_client::kill(&config.config, user.as_deref(), id.as_deref())
        }
        Some(Command::Revoke { config, user, duration, undo }) => {
            admin_client::revoke(&config.config, &user, duration, undo)
        }
        Some(Command::Drain { config, wait, undo }) => admin_client::drain(&config.config, wait, undo),
        Some(Command::Completions { shell }) => tools::completions(shell),
        Some(Command::Man) => tools::man(),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("turnpike: {message}");
            ExitCode::FAILURE
        }
    }
}
