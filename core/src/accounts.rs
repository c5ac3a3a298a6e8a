//! Accounts: password hashing (argon2id, PHC strings) and registration input rules.
//!
//! Hashing is the one expensive step of login and registration. The salt comes from the
//! caller's RNG (the machine's seeded one), so a simulation run is reproducible.

use std::sync::{Mutex, PoisonError};

use argon2::password_hash::{
    self, Decimal, Ident, Output, ParamsString, PasswordHash, PasswordHasher, PasswordVerifier,
    Salt, SaltString,
};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::RngCore;

/// Longest user name, in characters (all ASCII, so also bytes).
pub const MAX_NAME_LEN: usize = 32;
/// Longest password, in characters (so the API's OpenAPI document can state it: JSON
/// Schema's `maxLength` counts characters). Bounds the work an attacker can make one hash
/// cost: at most 512 bytes of UTF-8.
pub const MAX_PASSWORD_LEN: usize = 128;
/// Shortest password accepted at registration by default, in characters
/// (`--min-password-len`).
pub const DEFAULT_MIN_PASSWORD_LEN: usize = 8;
/// Names no account may take, in any case: `all` is the group chat everyone is in (a user
/// of that name would be ambiguous wherever a conversation or a user is named). Other
/// conversation names (`g:<name>`, `p:<a>:<b>`) contain `:`, which names never do.
pub const RESERVED_NAMES: &[&str] = &["all"];

/// Salt length in bytes (the PHC recommendation).
pub const SALT_LEN: usize = 16;

/// Argon2id cost parameters, validated when built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordParams {
    params: Params,
}

impl PasswordParams {
    /// `m_cost_kib` memory in KiB, `t_cost` passes, `p_cost` lanes.
    pub fn new(m_cost_kib: u32, t_cost: u32, p_cost: u32) -> Result<Self, HashError> {
        let params =
            Params::new(m_cost_kib, t_cost, p_cost, None).map_err(|e| HashError(e.to_string()))?;
        Ok(Self { params })
    }

    /// Cheap parameters for tests and simulations: a hash takes microseconds. Never for
    /// production, which is why this is not the default.
    pub fn for_tests() -> Self {
        // 64 KiB >= 8 * p_cost and t_cost >= 1: within argon2's bounds.
        Self::new(64, 1, 1).expect("64 KiB, t=1, p=1 are valid argon2 parameters")
    }

    pub fn m_cost_kib(&self) -> u32 {
        self.params.m_cost()
    }
    pub fn t_cost(&self) -> u32 {
        self.params.t_cost()
    }
    pub fn p_cost(&self) -> u32 {
        self.params.p_cost()
    }
}

impl Default for PasswordParams {
    /// OWASP's argon2id recommendation: 19 MiB, 2 passes, 1 lane.
    fn default() -> Self {
        Self::new(19_456, 2, 1).expect("OWASP's argon2id parameters are valid")
    }
}

/// Hashing failed (only with parameters argon2 rejects).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(pub(crate) String);

/// Hashes `password` with argon2id into a PHC string (`$argon2id$v=19$m=..,t=..,p=..$salt$hash`),
/// with a fresh 16-byte salt from `rng`.
pub fn hash_password(
    password: &str,
    params: &PasswordParams,
    rng: &mut impl RngCore,
) -> Result<String, HashError> {
    let mut salt = [0u8; SALT_LEN];
    rng.fill_bytes(&mut salt);
    hash_password_with_salt(password, params, &salt)
}

/// [`hash_password`] with the salt given: the route draws it from its seeded RNG and runs
/// the (slow) hashing elsewhere.
pub fn hash_password_with_salt(
    password: &str,
    params: &PasswordParams,
    salt: &[u8; SALT_LEN],
) -> Result<String, HashError> {
    let salt = SaltString::encode_b64(salt).map_err(|e| HashError(e.to_string()))?;
    let argon = PooledArgon2 {
        algorithm: Algorithm::Argon2id,
        version: Version::V0x13,
        params: params.params.clone(),
    };
    argon
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// Whether `password` matches the PHC string `phc`. The parameters are read from `phc`, so
/// old hashes keep verifying after the defaults change. A malformed `phc` is `false`.
pub fn verify_password(password: &str, phc: &str) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    // The defaults are only a starting point: verification uses the algorithm, version and
    // parameters recorded in the hash, and compares in constant time (password_hash's
    // `PasswordVerifier` for every `PasswordHasher`).
    PooledArgon2::default()
        .verify_password(password.as_bytes(), &hash)
        .is_ok()
}

// --- argon2 memory, reused --------------------------------------------------------------
//
// Each hash needs `m_cost` KiB of working memory (19 MiB by default). argon2's own
// `hash_password` allocates and frees it every time, on whichever thread runs the job; with
// glibc that memory stays in per-thread arenas after a burst (a `cim up` stayed at ~800 MB
// after 400 registrations and logins). Here the blocks come from a small process-wide pool
// instead: at most as many buffers as hashes ever ran at once (bounded by the route's
// password workers), reused by every later hash, never returned to the allocator. No unsafe
// code, no allocator of our own.

/// Buffers kept for reuse; more hashes at once than this allocate and free their own.
const MAX_POOLED_BUFFERS: usize = 8;

static BLOCK_POOL: Mutex<Vec<Vec<Block>>> = Mutex::new(Vec::new());

/// Runs `f` with `count` blocks of argon2 working memory from the pool (their contents are
/// whatever a previous hash left: argon2 overwrites every block before reading it).
fn with_blocks<R>(count: usize, f: impl FnOnce(&mut [Block]) -> R) -> R {
    let taken = BLOCK_POOL
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop();
    let mut blocks = taken.unwrap_or_default();
    if blocks.len() < count {
        blocks.resize(count, Block::new());
    }
    let result = f(&mut blocks[..count]);
    let mut pool = BLOCK_POOL.lock().unwrap_or_else(PoisonError::into_inner);
    if pool.len() < MAX_POOLED_BUFFERS {
        pool.push(blocks);
    }
    result
}

/// Buffers in the pool now and their total size in bytes (for tests and metrics).
pub fn pooled_hash_memory() -> (usize, usize) {
    let pool = BLOCK_POOL.lock().unwrap_or_else(PoisonError::into_inner);
    let bytes = pool.iter().map(|b| b.capacity() * Block::SIZE).sum();
    (pool.len(), bytes)
}

/// argon2 with its working memory from [`BLOCK_POOL`]; otherwise exactly argon2's
/// `PasswordHasher` (same PHC strings), and so its `PasswordVerifier` too.
#[derive(Default)]
struct PooledArgon2 {
    algorithm: Algorithm,
    version: Version,
    params: Params,
}

impl PasswordHasher for PooledArgon2 {
    type Params = Params;

    fn hash_password<'a>(
        &self,
        password: &[u8],
        salt: impl Into<Salt<'a>>,
    ) -> password_hash::Result<PasswordHash<'a>> {
        let salt = salt.into();
        let mut salt_bytes = [0u8; 64];
        let salt_bytes = salt.decode_b64(&mut salt_bytes)?;
        let argon = Argon2::new(self.algorithm, self.version, self.params.clone());
        let output_len = self
            .params
            .output_len()
            .unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let output = Output::init_with(output_len, |out| {
            with_blocks(self.params.block_count(), |blocks| {
                argon.hash_password_into_with_memory(password, salt_bytes, out, blocks)
            })?;
            Ok(())
        })?;
        Ok(PasswordHash {
            algorithm: self.algorithm.ident(),
            version: Some(self.version.into()),
            params: ParamsString::try_from(&self.params)?,
            salt: Some(salt),
            hash: Some(output),
        })
    }

    fn hash_password_customized<'a>(
        &self,
        password: &[u8],
        algorithm: Option<Ident<'a>>,
        version: Option<Decimal>,
        params: Params,
        salt: impl Into<Salt<'a>>,
    ) -> password_hash::Result<PasswordHash<'a>> {
        let hasher = Self {
            algorithm: algorithm
                .map(Algorithm::try_from)
                .transpose()?
                .unwrap_or_default(),
            version: version
                .map(Version::try_from)
                .transpose()?
                .unwrap_or_default(),
            params,
        };
        hasher.hash_password(password, salt)
    }
}

/// Why a registration was refused before reaching the store (CIM code 3000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("user name must not be empty")]
    EmptyName,
    #[error("user name must be at most 32 characters")]
    NameTooLong,
    #[error("user names may only contain A-Z a-z 0-9 _ - .")]
    BadNameCharacter,
    #[error("user name {0:?} is reserved")]
    ReservedName(&'static str),
    #[error("password must not be empty")]
    EmptyPassword,
    #[error("password must be at least {0} characters")]
    PasswordTooShort(usize),
    #[error("password must be at most 128 characters")]
    PasswordTooLong,
}

impl RegisterError {
    pub fn code(self) -> &'static str {
        "3000"
    }
}

/// Checks a registration's name and password, with passwords of at least
/// `min_password_len` characters. Names are ASCII only, so two accounts cannot have names
/// that look alike but differ in Unicode (and the store makes them unique regardless of
/// ASCII case); the [`RESERVED_NAMES`] are refused in any case.
pub fn validate_registration(
    name: &str,
    password: &str,
    min_password_len: usize,
) -> Result<(), RegisterError> {
    if name.is_empty() {
        return Err(RegisterError::EmptyName);
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(RegisterError::BadNameCharacter);
    }
    // All ASCII from here, so bytes = characters.
    if name.len() > MAX_NAME_LEN {
        return Err(RegisterError::NameTooLong);
    }
    if let Some(reserved) = RESERVED_NAMES
        .iter()
        .find(|reserved| name.eq_ignore_ascii_case(reserved))
    {
        return Err(RegisterError::ReservedName(reserved));
    }
    if password.is_empty() {
        return Err(RegisterError::EmptyPassword);
    }
    if password.chars().count() < min_password_len {
        return Err(RegisterError::PasswordTooShort(min_password_len));
    }
    if password.chars().count() > MAX_PASSWORD_LEN {
        return Err(RegisterError::PasswordTooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn hash_then_verify() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let params = PasswordParams::for_tests();
        let phc = hash_password("hunter2", &params, &mut rng).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{phc}");
        assert!(verify_password("hunter2", &phc));
        assert!(!verify_password("hunter3", &phc));
        assert!(!verify_password("", &phc));
    }

    #[test]
    fn pooled_hashing_is_argon2_exactly_and_reuses_its_memory() {
        let salt = [7u8; SALT_LEN];
        for params in [
            PasswordParams::for_tests(),
            PasswordParams::new(256, 2, 2).unwrap(),
        ] {
            let ours = hash_password_with_salt("hunter2", &params, &salt).unwrap();
            let theirs = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.params.clone())
                .hash_password(b"hunter2", &SaltString::encode_b64(&salt).unwrap())
                .unwrap()
                .to_string();
            assert_eq!(ours, theirs, "{params:?}");
            // Verification agrees with argon2's own, right or wrong password.
            for (password, right) in [("hunter2", true), ("hunter3", false), ("", false)] {
                let phc = PasswordHash::new(&theirs).unwrap();
                let argon_says = Argon2::default()
                    .verify_password(password.as_bytes(), &phc)
                    .is_ok();
                assert_eq!(verify_password(password, &theirs), right);
                assert_eq!(argon_says, right);
            }
        }
        // Other algorithms and versions verify too (parameters come from the hash).
        for (algorithm, version) in [
            (Algorithm::Argon2i, Version::V0x13),
            (Algorithm::Argon2d, Version::V0x10),
        ] {
            let phc = Argon2::new(algorithm, version, Params::new(64, 1, 1, Some(16)).unwrap())
                .hash_password(b"pw", &SaltString::encode_b64(&salt).unwrap())
                .unwrap()
                .to_string();
            assert!(verify_password("pw", &phc), "{phc}");
            assert!(!verify_password("pW", &phc), "{phc}");
        }
        // Many hashes, one after another, keep at most a few buffers (other tests of this
        // binary may hash at the same time, never more than the pool's cap).
        for i in 0..50 {
            hash_password_with_salt(&format!("pw{i}"), &PasswordParams::for_tests(), &salt)
                .unwrap();
        }
        let (buffers, _) = pooled_hash_memory();
        assert!((1..=MAX_POOLED_BUFFERS).contains(&buffers), "{buffers}");
    }

    #[test]
    fn salts_differ_and_come_from_the_rng() {
        let params = PasswordParams::for_tests();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = hash_password("pw", &params, &mut rng).unwrap();
        let b = hash_password("pw", &params, &mut rng).unwrap();
        assert_ne!(a, b, "same salt twice");
        // Same seed, same hash: runs are reproducible.
        let mut again = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(hash_password("pw", &params, &mut again).unwrap(), a);
    }

    #[test]
    fn malformed_phc_is_false() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let good = hash_password("pw", &PasswordParams::for_tests(), &mut rng).unwrap();
        let truncated = &good[..good.len() - 5];
        let mut wrong_hash = good.clone();
        wrong_hash.replace_range(good.len() - 4.., "AAAA");
        for bad in [
            "",
            "not a hash",
            "$argon2id$",
            "$argon2id$v=19$m=64,t=1,p=1$",
            "$unknown$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
            "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
            truncated,
            &wrong_hash,
        ] {
            assert!(!verify_password("pw", bad), "{bad:?} verified");
        }
    }

    #[test]
    fn default_params_are_owasp() {
        let p = PasswordParams::default();
        assert_eq!((p.m_cost_kib(), p.t_cost(), p.p_cost()), (19_456, 2, 1));
        let t = PasswordParams::for_tests();
        assert_eq!((t.m_cost_kib(), t.t_cost(), t.p_cost()), (64, 1, 1));
        assert!(PasswordParams::new(1, 1, 1).is_err());
    }

    #[test]
    fn registration_rules_table() {
        let long_name = "a".repeat(33);
        let max_name = "a".repeat(32);
        let long_pw = "p".repeat(129);
        let max_pw = "p".repeat(128);
        let min = DEFAULT_MIN_PASSWORD_LEN;
        let cases: &[(&str, &str, Result<(), RegisterError>)] = &[
            ("alice", "password", Ok(())),
            ("a.b-c_D9", "12345678", Ok(())),
            (&max_name, &max_pw, Ok(())),
            ("", "password", Err(RegisterError::EmptyName)),
            (&long_name, "password", Err(RegisterError::NameTooLong)),
            ("al ice", "password", Err(RegisterError::BadNameCharacter)),
            (" bob", "password", Err(RegisterError::BadNameCharacter)),
            ("bob ", "password", Err(RegisterError::BadNameCharacter)),
            ("älice", "password", Err(RegisterError::BadNameCharacter)),
            // A Kelvin sign is not a K: Unicode never reaches the store's case folding.
            (
                "\u{212a}en",
                "password",
                Err(RegisterError::BadNameCharacter),
            ),
            ("a/b", "password", Err(RegisterError::BadNameCharacter)),
            ("g:rust", "password", Err(RegisterError::BadNameCharacter)),
            ("p:1:2", "password", Err(RegisterError::BadNameCharacter)),
            ("@bob", "password", Err(RegisterError::BadNameCharacter)),
            ("all", "password", Err(RegisterError::ReservedName("all"))),
            ("ALL", "password", Err(RegisterError::ReservedName("all"))),
            ("All", "password", Err(RegisterError::ReservedName("all"))),
            ("all_", "password", Ok(())),
            ("ball", "password", Ok(())),
            ("alice", "", Err(RegisterError::EmptyPassword)),
            ("alice", "p", Err(RegisterError::PasswordTooShort(min))),
            (
                "alice",
                "1234567",
                Err(RegisterError::PasswordTooShort(min)),
            ),
            // Characters, not bytes: seven of them are too few however many bytes.
            (
                "alice",
                "ééééééé",
                Err(RegisterError::PasswordTooShort(min)),
            ),
            ("alice", "éééééééé", Ok(())),
            ("alice", &long_pw, Err(RegisterError::PasswordTooLong)),
            // Characters, not bytes, here too: 128 of them are enough however many bytes.
            ("alice", &"é".repeat(MAX_PASSWORD_LEN), Ok(())),
            (
                "alice",
                &"é".repeat(MAX_PASSWORD_LEN + 1),
                Err(RegisterError::PasswordTooLong),
            ),
        ];
        for (name, pw, want) in cases {
            assert_eq!(
                validate_registration(name, pw, min),
                *want,
                "{name:?} {pw:?}"
            );
        }
        // The minimum is configurable.
        assert_eq!(validate_registration("alice", "pw", 2), Ok(()));
        assert_eq!(
            validate_registration("alice", "pw", 12),
            Err(RegisterError::PasswordTooShort(12))
        );
        assert_eq!(
            RegisterError::PasswordTooShort(8).to_string(),
            "password must be at least 8 characters"
        );
        assert_eq!(
            RegisterError::ReservedName("all").to_string(),
            "user name \"all\" is reserved"
        );
    }
}
