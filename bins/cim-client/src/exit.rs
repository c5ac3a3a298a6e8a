//! The client's exit codes: a script can tell a wrong password from an unreachable route
//! from a message nobody will ever receive. Documented in `docs/client.md`; the table there
//! is checked against [`Failure::ALL`] by a test.

use std::process::ExitCode;

/// Why a run did not do all it was asked. A run reports the first failure it met (later
/// ones are printed too, but the code is the first's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Anything else: the state file cannot be read or written, bad `--route`, ...
    Other,
    /// The route refused the login: wrong password, or the id and name do not match.
    LoginRejected,
    /// Registration refused (the name is taken, or not a valid name).
    RegistrationRefused,
    /// TLS with the route or a server cannot work: a certificate did not verify, or one
    /// side speaks TLS and the other does not.
    Tls,
    /// The route or every server stayed unreachable: messages were not delivered (they are
    /// kept in the state file and sent by the next run), or a command could not run.
    Unreachable,
    /// `@name` (or `@id`) is no user.
    UnknownRecipient,
    /// A message longer than the server accepts.
    TooLong,
    /// An input line that is not a valid command or message, or a command the route refused
    /// (a group that does not exist, ...).
    BadLine,
    /// A message the server refused for another reason (not a member, ...), or whose fate is
    /// unknown.
    MessageRejected,
    /// The user logged in elsewhere and that login won (or this one was logged out).
    LoggedInElsewhere,
}

impl Failure {
    #[cfg(test)]
    pub const ALL: [Failure; 10] = [
        Self::Other,
        Self::LoginRejected,
        Self::RegistrationRefused,
        Self::Tls,
        Self::Unreachable,
        Self::UnknownRecipient,
        Self::TooLong,
        Self::BadLine,
        Self::MessageRejected,
        Self::LoggedInElsewhere,
    ];

    /// The process's exit code. 2 is clap's, for a bad command line.
    pub fn code(self) -> u8 {
        match self {
            Self::Other => 1,
            Self::LoginRejected => 3,
            Self::RegistrationRefused => 4,
            Self::Tls => 5,
            Self::Unreachable => 6,
            Self::UnknownRecipient => 7,
            Self::TooLong => 8,
            Self::BadLine => 9,
            Self::MessageRejected => 10,
            Self::LoggedInElsewhere => 11,
        }
    }

    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(self.code())
    }
}

/// An error that ends the run with a given [`Failure`]: `main` finds it in the error chain.
#[derive(Debug)]
pub struct Fatal {
    pub failure: Failure,
    pub message: String,
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fatal {}

/// The failure an error ends the run with.
pub fn failure_of(error: &anyhow::Error) -> Failure {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<Fatal>())
        .map_or(Failure::Other, |f| f.failure)
}

pub fn fatal(failure: Failure, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Fatal {
        failure,
        message: message.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_leave_2_to_clap() {
        let codes: std::collections::BTreeSet<u8> = Failure::ALL.iter().map(|f| f.code()).collect();
        assert_eq!(codes.len(), Failure::ALL.len());
        assert!(!codes.contains(&0) && !codes.contains(&2));
    }

    #[test]
    fn the_docs_list_every_code() {
        let docs = include_str!("../../../docs/client.md");
        for failure in Failure::ALL {
            let row = format!("| {} |", failure.code());
            assert!(
                docs.contains(&row),
                "docs/client.md lacks a row {row} for {failure:?}"
            );
        }
        assert!(docs.contains("| 2 |"), "clap's code 2");
    }

    #[test]
    fn a_fatal_error_keeps_its_failure_under_context() {
        let error = fatal(Failure::Tls, "bad cert").context("registering");
        assert_eq!(failure_of(&error), Failure::Tls);
        assert_eq!(failure_of(&anyhow::anyhow!("x")), Failure::Other);
    }
}
