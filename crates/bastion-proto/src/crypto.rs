//! KMS session encryption of the data channel, sans-IO.
//!
//! Only the symmetric part lives here: the KMS calls themselves (GenerateDataKey on the
//! client, Decrypt on the agent) are made by the IO layer, which passes the 64-byte
//! plaintext data key in and takes the encryption context for those calls out.
//!
//! The rules, each checked against the references at the revisions named in the facts
//! sheet (`ssm-protocol-facts.md` §6.5):
//!
//! * **Key split.** The 64-byte plaintext key is cut in two halves: bytes `0..32` are the
//!   agent→client key (the agent encrypts with it, the client decrypts with it) and
//!   bytes `32..64` the client→agent key. [P] `src/encryption/encrypter.go` fn
//!   `generateEncryptionKey` (`decryptionKey = plainTextKey[:keySize]`,
//!   `encryptionKey = plainTextKey[keySize:]`); [A] `agent/session/crypto/blockcipher.go`
//!   fn `UpdateEncryptionKey` (`encryptionKey = plainTextKey[:32]`, `decryptionKey =
//!   plainTextKey[32:]`).
//! * **Cipher.** AES-256-GCM, 12-byte nonce, 16-byte tag, no additional data; the wire
//!   form is `nonce(12) || ciphertext || tag(16)`. [P] `encrypter.go` fn `Encrypt` /
//!   `Decrypt`; [A] `blockcipher.go` fn `EncryptWithAESGCM` / `DecryptWithAESGCM`.
//! * **Nonces.** The client draws 12 random bytes per message ([P] fn `Encrypt`); the agent
//!   counts up from a random start ([A] `agent/session/crypto/nonce.go`, see
//!   [`NonceCounter`]). A receiver only reads the first 12 bytes, so either rule
//!   interoperates.
//! * **Which payloads** are encrypted: [`is_encrypted`].
//! * **The challenge round trip** of the handshake: [`SessionCipher::make_challenge`],
//!   [`SessionCipher::answer_challenge`], [`SessionCipher::verify_challenge_response`].
//! * **The KMS encryption context**: [`encryption_context`].

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::SecureRandom;
use thiserror::Error;

use super::kind::PayloadType;

/// Size of the plaintext data key the client asks KMS for (`NumberOfBytes`): [P]
/// `src/encryption/kmsservice.go` const `KMSKeySizeInBytes`; [A]
/// `agent/session/crypto/kmsservice.go` const `KMSKeySizeInBytes`.
pub const DATA_KEY_LEN: usize = 64;
/// Size of each of the two AES-256 keys cut from the data key.
pub const KEY_LEN: usize = DATA_KEY_LEN / 2;
/// AES-GCM nonce size: [P] `encrypter.go` const `nonceSize`; [A] `blockcipher.go` const
/// `nonceSize`.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag size (Go's `cipher.NewGCM` default, used by both references).
pub const TAG_LEN: usize = 16;
/// The shortest valid wire payload: a nonce and a tag around an empty plaintext.
pub const MIN_WIRE_LEN: usize = NONCE_LEN + TAG_LEN;
/// Size of the random plaintext the agent encrypts as its encryption challenge: [A]
/// `agent/session/datachannel/datachannel.go` fn `sendEncryptionChallenge`
/// (`make([]byte, 64)`).
pub const CHALLENGE_PLAINTEXT_LEN: usize = 64;
/// Size of the random bytes behind the `Challenge` string of the agent's KMSEncryption
/// action: [A] `blockcipher.go` const `randomChallengeSize`.
pub const RANDOM_CHALLENGE_LEN: usize = 16;

/// Encryption-context key for the session id: [P] `src/datachannel/streaming.go` fn
/// `ProcessKMSEncryptionHandshakeAction`; [A] `blockcipher.go` fn `UpdateEncryptionKey`
/// const `encryptionContextSessionIdKey`.
pub const CONTEXT_SESSION_ID: &str = "aws:ssm:SessionId";
/// Encryption-context key for the target (instance / managed-node) id: [P] fn
/// `ProcessKMSEncryptionHandshakeAction`; [A] fn `UpdateEncryptionKey` const
/// `encryptionContextTargetIdKey`.
pub const CONTEXT_TARGET_ID: &str = "aws:ssm:TargetId";
/// Encryption-context key for the agent's random challenge, used only when the client
/// acknowledges it: [A] fn `UpdateEncryptionKey` const `encryptionContextChallengeKey`.
/// [P] at the reference revision never sends it.
pub const CONTEXT_RANDOM_CHALLENGE: &str = "aws:ssm:RandomChallenge";

/// The two ends of a data channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The session-manager-plugin side (us in production).
    Client,
    /// The SSM agent side (our simulator).
    Agent,
}

impl Role {
    /// The direction of the messages this role sends.
    pub fn sends(self) -> Direction {
        match self {
            Role::Client => Direction::ClientToAgent,
            Role::Agent => Direction::AgentToClient,
        }
    }

    /// The direction of the messages this role receives.
    pub fn receives(self) -> Direction {
        match self {
            Role::Client => Direction::AgentToClient,
            Role::Agent => Direction::ClientToAgent,
        }
    }
}

/// The direction a stream-data message travels in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// `input_stream_data`, client to agent.
    ClientToAgent,
    /// `output_stream_data`, agent to client.
    AgentToClient,
}

/// True when, once KMS encryption is on, a stream-data payload of `payload_type` sent in
/// `direction` is encrypted (and must be decrypted by the receiver).
///
/// * Client → agent: only PT 1 Output. [P] `streaming.go` fn `SendInputDataMessage`
///   encrypts only `message.Output`; [A] `datachannel.go` fn `processStreamDataMessage`
///   decrypts only `mgsContracts.Output`.
/// * Agent → client: PT 1 Output, 11 StdErr and 12 ExitCode. [A] `datachannel.go` fn
///   `SendStreamDataMessage` encrypts these three; [P] `streaming.go` fn
///   `HandleOutputMessage` and fn `ProcessIncomingMessageBufferItems` decrypt these three.
///
/// Everything else (Size, Flag, the handshake and challenge payloads) travels in clear;
/// PT 8/9 carry ciphertext inside their JSON instead.
pub fn is_encrypted(direction: Direction, payload_type: PayloadType) -> bool {
    match direction {
        Direction::ClientToAgent => payload_type == PayloadType::Output,
        Direction::AgentToClient => matches!(
            payload_type,
            PayloadType::Output | PayloadType::StdErr | PayloadType::ExitCode
        ),
    }
}

/// Builds the KMS encryption context for GenerateDataKey (client) and Decrypt (agent).
///
/// Always `{"aws:ssm:SessionId": session_id, "aws:ssm:TargetId": target_id}` ([P]
/// `streaming.go` fn `ProcessKMSEncryptionHandshakeAction`; [A] `blockcipher.go` fn
/// `UpdateEncryptionKey`). With `Some(challenge)` it adds `"aws:ssm:RandomChallenge"`
/// with the agent's `Challenge` string exactly as received (base64 text, not its
/// decoded bytes): [A] fn `UpdateEncryptionKey` adds it iff the client's
/// `ChallengeAcknowledgement` is true ([A] `datachannel.go` fn `finalizeKMSEncryption`),
/// so a client passing `Some` here must also acknowledge the challenge, and one passing
/// `None` must not.
///
/// The agent's `aws:ssm:TargetId` is its own instance id, so `target_id` must be the
/// managed-node id the session targets.
pub fn encryption_context(
    session_id: &str,
    target_id: &str,
    random_challenge: Option<&str>,
) -> BTreeMap<String, String> {
    let mut context = BTreeMap::new();
    context.insert(CONTEXT_SESSION_ID.to_owned(), session_id.to_owned());
    context.insert(CONTEXT_TARGET_ID.to_owned(), target_id.to_owned());
    if let Some(challenge) = random_challenge {
        context.insert(CONTEXT_RANDOM_CHALLENGE.to_owned(), challenge.to_owned());
    }
    context
}

/// Makes the `Challenge` string of the agent's KMSEncryption action: standard base64 of
/// 16 random bytes ([A] `blockcipher.go` fn `NewBlockCipherKMS`). Used by the simulator.
pub fn new_random_challenge(rng: &dyn SecureRandom) -> Result<String, CryptoError> {
    let mut bytes = [0u8; RANDOM_CHALLENGE_LEN];
    rng.fill(&mut bytes).map_err(|_| CryptoError::Rng)?;
    Ok(B64.encode(bytes))
}

/// Why an encryption operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// The KMS plaintext data key is not 64 bytes.
    #[error("KMS data key has {0} bytes, expected {DATA_KEY_LEN}")]
    DataKeyLength(usize),
    /// ring refused the AES-256-GCM key (cannot happen with a 32-byte key).
    #[error("AES-256-GCM key setup failed")]
    KeySetup,
    /// An encrypted payload cannot hold a 12-byte nonce and a 16-byte tag. (The
    /// references slice the nonce without a check and panic below 12 bytes.)
    #[error("encrypted payload of {len} bytes is shorter than nonce + tag ({MIN_WIRE_LEN} bytes)")]
    TooShort {
        /// Length of the payload.
        len: usize,
    },
    /// The tag does not authenticate the payload under this key: tampered data, the
    /// wrong key half, or a different data key.
    #[error("AES-GCM authentication failed")]
    AuthFailed,
    /// The plaintext is too large for one AES-GCM message.
    #[error("AES-GCM encryption failed (plaintext too large)")]
    SealFailed,
    /// The random number generator failed.
    #[error("random number generator failed")]
    Rng,
    /// A role-specific operation was called on a cipher of the other role.
    #[error("{operation} is a {expected:?} operation but this cipher is for the {actual:?}")]
    WrongRole {
        /// The operation called.
        operation: &'static str,
        /// The role it needs.
        expected: Role,
        /// The cipher's role.
        actual: Role,
    },
    /// `verify_challenge_response` was called before `make_challenge`.
    #[error("no encryption challenge is outstanding")]
    NoChallenge,
    /// The client's answer does not decrypt to the challenge ([A] `datachannel.go` fn
    /// `handleEncryptionChallengeResponse`: "Encryption challenge does not match!").
    #[error("Encryption challenge does not match!")]
    ChallengeMismatch,
}

/// The 64-byte plaintext data key returned by KMS GenerateDataKey / Decrypt.
///
/// Its `Debug` output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey {
    bytes: [u8; DATA_KEY_LEN],
}

impl DataKey {
    /// Takes the KMS plaintext. Exactly 64 bytes are required: that is what the client
    /// asks for, and [A] `blockcipher.go` fn `UpdateEncryptionKey` cuts at a fixed 32
    /// whatever the length, while [P] fn `generateEncryptionKey` cuts at `len / 2`; the two
    /// only agree on 64.
    pub fn from_plaintext(plaintext: &[u8]) -> Result<DataKey, CryptoError> {
        let bytes: [u8; DATA_KEY_LEN] = plaintext
            .try_into()
            .map_err(|_| CryptoError::DataKeyLength(plaintext.len()))?;
        Ok(DataKey { bytes })
    }

    /// Bytes `0..32`: the agent→client key (agent encrypts, client decrypts).
    pub fn agent_to_client(&self) -> &[u8] {
        &self.bytes[..KEY_LEN]
    }

    /// Bytes `32..64`: the client→agent key (client encrypts, agent decrypts).
    pub fn client_to_agent(&self) -> &[u8] {
        &self.bytes[KEY_LEN..]
    }

    /// The key for messages travelling in `direction`.
    pub fn key_for(&self, direction: Direction) -> &[u8] {
        match direction {
            Direction::AgentToClient => self.agent_to_client(),
            Direction::ClientToAgent => self.client_to_agent(),
        }
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// The agent's nonce rule: a 96-bit counter held as three u32 words, least significant
/// first, serialized little-endian, starting from a random value.
///
/// [A] `agent/session/crypto/nonce.go` fn `InitializeNonce` (12 random bytes read as three
/// little-endian u32 words) and fn `GenerateNonce` (return the current state, then add
/// one to word 0 carrying into words 1 and 2; after all ones it wraps to zero without an
/// error). The byte form is therefore a little-endian 96-bit integer counting up by one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonceCounter {
    words: [u32; 3],
}

impl NonceCounter {
    /// A counter whose next nonce is `words` (word 0 least significant).
    pub fn from_words(words: [u32; 3]) -> NonceCounter {
        NonceCounter { words }
    }

    /// A counter whose next nonce is exactly `nonce`.
    pub fn from_nonce(nonce: [u8; NONCE_LEN]) -> NonceCounter {
        let word = |i: usize| {
            u32::from_le_bytes([
                nonce[4 * i],
                nonce[4 * i + 1],
                nonce[4 * i + 2],
                nonce[4 * i + 3],
            ])
        };
        NonceCounter {
            words: [word(0), word(1), word(2)],
        }
    }

    /// A counter starting from 12 random bytes, as [A] fn `InitializeNonce` does.
    pub fn random(rng: &dyn SecureRandom) -> Result<NonceCounter, CryptoError> {
        let mut start = [0u8; NONCE_LEN];
        rng.fill(&mut start).map_err(|_| CryptoError::Rng)?;
        Ok(NonceCounter::from_nonce(start))
    }

    /// The current state, word 0 least significant.
    pub fn words(&self) -> [u32; 3] {
        self.words
    }

    /// Returns the current state as a nonce and advances the counter by one.
    pub fn next_nonce(&mut self) -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        for (chunk, word) in nonce.chunks_exact_mut(4).zip(self.words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        for word in &mut self.words {
            *word = word.wrapping_add(1);
            if *word != 0 {
                break;
            }
        }
        nonce
    }
}

/// How a [`SessionCipher`] picks the nonce of each message it encrypts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NonceRule {
    /// 12 fresh bytes from the caller's RNG per message ([P] `encrypter.go` fn `Encrypt`).
    Random,
    /// The agent's counter ([A] `nonce.go`).
    Counter(NonceCounter),
}

/// One end's AES-256-GCM state for an encrypted session.
///
/// Built from the data key for a [`Role`]: the client seals with bytes `32..64` and opens
/// with `0..32`; the agent the other way round (module docs). Nonces follow
/// [`NonceRule::Random`] unless [`SessionCipher::with_nonce_counter`] installs the
/// agent's counter.
pub struct SessionCipher {
    role: Role,
    seal_key: LessSafeKey,
    open_key: LessSafeKey,
    nonces: NonceRule,
    pending_challenge: Option<Vec<u8>>,
}

impl fmt::Debug for SessionCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCipher")
            .field("role", &self.role)
            .field("nonces", &self.nonces)
            .field("pending_challenge", &self.pending_challenge.is_some())
            .finish_non_exhaustive()
    }
}

fn aes_key(bytes: &[u8]) -> Result<LessSafeKey, CryptoError> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| CryptoError::KeySetup)
}

impl SessionCipher {
    /// The cipher of `role` for `key`, with random nonces.
    pub fn new(role: Role, key: &DataKey) -> Result<SessionCipher, CryptoError> {
        Ok(SessionCipher {
            role,
            seal_key: aes_key(key.key_for(role.sends()))?,
            open_key: aes_key(key.key_for(role.receives()))?,
            nonces: NonceRule::Random,
            pending_challenge: None,
        })
    }

    /// [`SessionCipher::new`] from the raw KMS plaintext (must be 64 bytes).
    pub fn from_plaintext_key(role: Role, plaintext: &[u8]) -> Result<SessionCipher, CryptoError> {
        SessionCipher::new(role, &DataKey::from_plaintext(plaintext)?)
    }

    /// Switches to the agent's counter nonces ([A] `nonce.go`), starting at `counter`.
    pub fn with_nonce_counter(mut self, counter: NonceCounter) -> SessionCipher {
        self.nonces = NonceRule::Counter(counter);
        self
    }

    /// The role this cipher was built for.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The nonce rule in force (with the counter's current state).
    pub fn nonce_rule(&self) -> &NonceRule {
        &self.nonces
    }

    /// Encrypts an outgoing payload into `nonce || ciphertext || tag`.
    ///
    /// The nonce comes from `rng` ([`NonceRule::Random`]) or from the counter
    /// ([`NonceRule::Counter`], which does not touch `rng`).
    pub fn encrypt(
        &mut self,
        plaintext: &[u8],
        rng: &dyn SecureRandom,
    ) -> Result<Vec<u8>, CryptoError> {
        let nonce = match &mut self.nonces {
            NonceRule::Random => {
                let mut nonce = [0u8; NONCE_LEN];
                rng.fill(&mut nonce).map_err(|_| CryptoError::Rng)?;
                nonce
            }
            NonceRule::Counter(counter) => counter.next_nonce(),
        };
        self.encrypt_with_nonce(nonce, plaintext)
    }

    /// Encrypts with a caller-chosen nonce. The caller must never reuse a nonce under the
    /// same key; this exists for tests and golden vectors.
    pub fn encrypt_with_nonce(
        &self,
        nonce: [u8; NONCE_LEN],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut wire = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        wire.extend_from_slice(&nonce);
        wire.extend_from_slice(plaintext);
        let tag = self
            .seal_key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut wire[NONCE_LEN..],
            )
            .map_err(|_| CryptoError::SealFailed)?;
        wire.extend_from_slice(tag.as_ref());
        Ok(wire)
    }

    /// Decrypts an incoming `nonce || ciphertext || tag` payload.
    ///
    /// Errors, never panics: [`CryptoError::TooShort`] below 28 bytes,
    /// [`CryptoError::AuthFailed`] when the tag does not verify.
    pub fn decrypt(&self, wire: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if wire.len() < MIN_WIRE_LEN {
            return Err(CryptoError::TooShort { len: wire.len() });
        }
        let (nonce, sealed) = wire.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| CryptoError::TooShort { len: wire.len() })?;
        let mut buf = sealed.to_vec();
        let plain_len = self
            .open_key
            .open_in_place(nonce, Aad::empty(), &mut buf)
            .map_err(|_| CryptoError::AuthFailed)?
            .len();
        buf.truncate(plain_len);
        Ok(buf)
    }

    fn require(&self, operation: &'static str, expected: Role) -> Result<(), CryptoError> {
        if self.role == expected {
            Ok(())
        } else {
            Err(CryptoError::WrongRole {
                operation,
                expected,
                actual: self.role,
            })
        }
    }

    /// Client: answers the agent's EncChallengeRequest (PT 8).
    ///
    /// `challenge` is the decoded `Challenge` bytes of the request; the result goes,
    /// base64-encoded, into the `Challenge` of the EncChallengeResponse (PT 9). It
    /// decrypts with the agent→client key and re-encrypts the same plaintext with the
    /// client→agent key under a fresh nonce: [P] `streaming.go` fn
    /// `handleEncryptionChallengeRequest`. Like [P], the plaintext length is not checked.
    pub fn answer_challenge(
        &mut self,
        challenge: &[u8],
        rng: &dyn SecureRandom,
    ) -> Result<Vec<u8>, CryptoError> {
        self.require("answer_challenge", Role::Client)?;
        let plaintext = self.decrypt(challenge)?;
        self.encrypt(&plaintext, rng)
    }

    /// Agent: makes the encryption challenge sent as EncChallengeRequest (PT 8): 64 random
    /// bytes, encrypted with the agent→client key ([A] `datachannel.go` fn
    /// `sendEncryptionChallenge`). The plaintext is kept for
    /// [`SessionCipher::verify_challenge_response`]; a second call replaces it.
    pub fn make_challenge(&mut self, rng: &dyn SecureRandom) -> Result<Vec<u8>, CryptoError> {
        self.require("make_challenge", Role::Agent)?;
        let mut plaintext = vec![0u8; CHALLENGE_PLAINTEXT_LEN];
        rng.fill(&mut plaintext).map_err(|_| CryptoError::Rng)?;
        let ciphertext = self.encrypt(&plaintext, rng)?;
        self.pending_challenge = Some(plaintext);
        Ok(ciphertext)
    }

    /// Agent: checks the client's EncChallengeResponse (PT 9) `Challenge` bytes: they must
    /// decrypt under the client→agent key to the outstanding challenge ([A]
    /// `datachannel.go` fn `handleEncryptionChallengeResponse`).
    pub fn verify_challenge_response(&self, response: &[u8]) -> Result<(), CryptoError> {
        self.require("verify_challenge_response", Role::Agent)?;
        let expected = self
            .pending_challenge
            .as_deref()
            .ok_or(CryptoError::NoChallenge)?;
        let got = self.decrypt(response)?;
        let differs = got.len() != expected.len()
            || got
                .iter()
                .zip(expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                != 0;
        if differs {
            Err(CryptoError::ChallengeMismatch)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use serde_json::Value;

    const GOLDEN: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/ssm-golden-vectors.json"
    ));

    struct Vector {
        data_key: Vec<u8>,
        client_decrypt_key: Vec<u8>,
        client_encrypt_key: Vec<u8>,
        nonce: [u8; NONCE_LEN],
        plaintext: Vec<u8>,
        wire: Vec<u8>,
    }

    fn golden() -> Vector {
        let all: Value = serde_json::from_str(GOLDEN).expect("golden file is JSON");
        let v = &all["aes_gcm"];
        let field = |name: &str| -> Vec<u8> {
            hex::decode(v[name].as_str().expect("string field")).expect("hex field")
        };
        Vector {
            data_key: field("data_key_plaintext_64"),
            client_decrypt_key: field("client_decrypt_key"),
            client_encrypt_key: field("client_encrypt_key"),
            nonce: field("nonce").try_into().expect("12-byte nonce"),
            plaintext: v["plaintext_utf8"]
                .as_str()
                .expect("plaintext")
                .as_bytes()
                .to_vec(),
            wire: field("wire_payload"),
        }
    }

    fn pair() -> (SessionCipher, SessionCipher) {
        let key = DataKey::from_plaintext(&golden().data_key).expect("64-byte key");
        (
            SessionCipher::new(Role::Client, &key).expect("client"),
            SessionCipher::new(Role::Agent, &key).expect("agent"),
        )
    }

    #[test]
    fn key_split_matches_the_golden_halves() {
        let g = golden();
        let key = DataKey::from_plaintext(&g.data_key).expect("key");
        assert_eq!(key.agent_to_client(), &g.client_decrypt_key[..]);
        assert_eq!(key.client_to_agent(), &g.client_encrypt_key[..]);
        assert_eq!(key.key_for(Role::Client.sends()), &g.client_encrypt_key[..]);
        assert_eq!(
            key.key_for(Role::Client.receives()),
            &g.client_decrypt_key[..]
        );
        assert_eq!(format!("{key:?}"), "DataKey(<redacted>)");
    }

    #[test]
    fn data_key_must_be_64_bytes() {
        for len in [0, 32, 63, 65, 128] {
            assert_eq!(
                DataKey::from_plaintext(&vec![7u8; len]),
                Err(CryptoError::DataKeyLength(len))
            );
        }
        assert!(matches!(
            SessionCipher::from_plaintext_key(Role::Client, &[0u8; 48]),
            Err(CryptoError::DataKeyLength(48))
        ));
    }

    #[test]
    fn golden_vector_is_client_to_agent() {
        // The vector was sealed with the client's encrypt key (bytes 32..64): the client
        // reproduces it byte-exactly and the agent opens it.
        let g = golden();
        let (client, agent) = pair();
        assert_eq!(
            client
                .encrypt_with_nonce(g.nonce, &g.plaintext)
                .expect("seal"),
            g.wire
        );
        assert_eq!(agent.decrypt(&g.wire).expect("open"), g.plaintext);
        // The client's own decrypt key (0..32) does not open it.
        assert_eq!(client.decrypt(&g.wire), Err(CryptoError::AuthFailed));
        // And the agent's encrypt key produces something else.
        assert_ne!(
            agent
                .encrypt_with_nonce(g.nonce, &g.plaintext)
                .expect("seal"),
            g.wire
        );
    }

    #[test]
    fn wire_layout_is_nonce_ciphertext_tag() {
        let g = golden();
        assert_eq!(g.wire.len(), NONCE_LEN + g.plaintext.len() + TAG_LEN);
        assert_eq!(&g.wire[..NONCE_LEN], &g.nonce[..]);
    }

    #[test]
    fn tampering_anywhere_fails_authentication() {
        let g = golden();
        let (_, agent) = pair();
        for i in 0..g.wire.len() {
            let mut bad = g.wire.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                agent.decrypt(&bad),
                Err(CryptoError::AuthFailed),
                "byte {i}"
            );
        }
    }

    #[test]
    fn short_input_is_an_error_not_a_panic() {
        let (client, _) = pair();
        for len in 0..MIN_WIRE_LEN {
            assert_eq!(
                client.decrypt(&vec![0u8; len]),
                Err(CryptoError::TooShort { len })
            );
        }
        // Exactly nonce + tag is an empty plaintext: well-formed, so it authenticates or not.
        assert_eq!(
            client.decrypt(&[0u8; MIN_WIRE_LEN]),
            Err(CryptoError::AuthFailed)
        );
    }

    #[test]
    fn empty_plaintext_round_trips() {
        let (client, agent) = pair();
        let wire = agent.encrypt_with_nonce([9; NONCE_LEN], b"").expect("seal");
        assert_eq!(wire.len(), MIN_WIRE_LEN);
        assert_eq!(client.decrypt(&wire).expect("open"), b"");
    }

    #[test]
    fn roles_interoperate_in_both_directions() {
        let rng = SystemRandom::new();
        let (mut client, agent) = pair();
        let mut agent = agent.with_nonce_counter(NonceCounter::random(&rng).expect("rng"));
        let data: Vec<u8> = (0..=255u8).cycle().take(3000).collect();

        let up = client.encrypt(&data, &rng).expect("client seal");
        assert_eq!(agent.decrypt(&up).expect("agent open"), data);
        assert_eq!(client.decrypt(&up), Err(CryptoError::AuthFailed));

        let down = agent.encrypt(&data, &rng).expect("agent seal");
        assert_eq!(client.decrypt(&down).expect("client open"), data);
        assert_eq!(agent.decrypt(&down), Err(CryptoError::AuthFailed));

        let again = client.encrypt(&data, &rng).expect("client seal");
        assert_ne!(up[..NONCE_LEN], again[..NONCE_LEN], "fresh random nonce");
    }

    #[test]
    fn agent_counter_nonces_follow_the_reference_rule() {
        let mut c = NonceCounter::from_words([1, 2, 3]);
        assert_eq!(c.next_nonce(), [1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(c.words(), [2, 2, 3]);

        let mut c = NonceCounter::from_words([u32::MAX, 2, 3]);
        c.next_nonce();
        assert_eq!(c.words(), [0, 3, 3]);

        let mut c = NonceCounter::from_words([u32::MAX, u32::MAX, 7]);
        c.next_nonce();
        assert_eq!(c.words(), [0, 0, 8]);

        let mut c = NonceCounter::from_words([u32::MAX; 3]);
        assert_eq!(c.next_nonce(), [0xff; NONCE_LEN]);
        assert_eq!(c.words(), [0, 0, 0]);

        let start = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let mut c = NonceCounter::from_nonce(start);
        assert_eq!(c.words(), [0x0403_0201, 0x0807_0605, 0x0c0b_0a09]);
        assert_eq!(c.next_nonce(), start);
    }

    #[test]
    fn agent_cipher_uses_its_counter() {
        let rng = SystemRandom::new();
        let (client, agent) = pair();
        let mut agent = agent.with_nonce_counter(NonceCounter::from_words([5, 0, 0]));
        let first = agent.encrypt(b"a", &rng).expect("seal");
        let second = agent.encrypt(b"b", &rng).expect("seal");
        assert_eq!(&first[..NONCE_LEN], &[5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&second[..NONCE_LEN], &[6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(client.decrypt(&second).expect("open"), b"b");
        assert_eq!(
            agent.nonce_rule(),
            &NonceRule::Counter(NonceCounter::from_words([7, 0, 0]))
        );
    }

    #[test]
    fn challenge_round_trip() {
        let rng = SystemRandom::new();
        let (mut client, agent) = pair();
        let mut agent = agent.with_nonce_counter(NonceCounter::random(&rng).expect("rng"));

        assert_eq!(
            agent.verify_challenge_response(b"anything"),
            Err(CryptoError::NoChallenge)
        );
        let challenge = agent.make_challenge(&rng).expect("challenge");
        assert_eq!(
            challenge.len(),
            NONCE_LEN + CHALLENGE_PLAINTEXT_LEN + TAG_LEN
        );

        let answer = client.answer_challenge(&challenge, &rng).expect("answer");
        assert_ne!(answer, challenge);
        assert_eq!(agent.verify_challenge_response(&answer), Ok(()));

        // Echoing the challenge back (agent key) does not authenticate under 32..64.
        assert_eq!(
            agent.verify_challenge_response(&challenge),
            Err(CryptoError::AuthFailed)
        );
        // A well-formed answer to some other plaintext is a mismatch.
        let other = client
            .encrypt(&[0u8; CHALLENGE_PLAINTEXT_LEN], &rng)
            .expect("seal");
        assert_eq!(
            agent.verify_challenge_response(&other),
            Err(CryptoError::ChallengeMismatch)
        );
        // A fresh challenge replaces the old one.
        let _ = agent.make_challenge(&rng).expect("challenge");
        assert_eq!(
            agent.verify_challenge_response(&answer),
            Err(CryptoError::ChallengeMismatch)
        );
    }

    #[test]
    fn challenge_operations_check_the_role() {
        let rng = SystemRandom::new();
        let (mut client, mut agent) = pair();
        assert!(matches!(
            client.make_challenge(&rng),
            Err(CryptoError::WrongRole {
                expected: Role::Agent,
                actual: Role::Client,
                ..
            })
        ));
        assert!(matches!(
            client.verify_challenge_response(&[0u8; 40]),
            Err(CryptoError::WrongRole { .. })
        ));
        assert!(matches!(
            agent.answer_challenge(&[0u8; 40], &rng),
            Err(CryptoError::WrongRole {
                expected: Role::Client,
                actual: Role::Agent,
                ..
            })
        ));
        assert_eq!(
            client.answer_challenge(&[0u8; 5], &rng),
            Err(CryptoError::TooShort { len: 5 })
        );
    }

    #[test]
    fn encrypted_payload_types_per_direction() {
        for v in 0..=13u32 {
            let pt = PayloadType::from_u32(v);
            assert_eq!(is_encrypted(Direction::ClientToAgent, pt), v == 1, "up {v}");
            assert_eq!(
                is_encrypted(Direction::AgentToClient, pt),
                matches!(v, 1 | 11 | 12),
                "down {v}"
            );
        }
        assert_eq!(Role::Client.sends(), Direction::ClientToAgent);
        assert_eq!(Role::Agent.sends(), Direction::AgentToClient);
        assert_eq!(Role::Agent.receives(), Direction::ClientToAgent);
    }

    #[test]
    fn encryption_context_keys() {
        let ctx = encryption_context("sess-1", "i-0123", None);
        assert_eq!(ctx.len(), 2);
        assert_eq!(ctx["aws:ssm:SessionId"], "sess-1");
        assert_eq!(ctx["aws:ssm:TargetId"], "i-0123");

        let ctx = encryption_context("sess-1", "i-0123", Some("q83vEjRWeJq83vEjRWeJqw=="));
        assert_eq!(ctx.len(), 3);
        assert_eq!(ctx["aws:ssm:RandomChallenge"], "q83vEjRWeJq83vEjRWeJqw==");
    }

    #[test]
    fn random_challenge_is_base64_of_16_bytes() {
        let s = new_random_challenge(&SystemRandom::new()).expect("rng");
        assert_eq!(s.len(), 24);
        assert_eq!(B64.decode(&s).expect("base64").len(), RANDOM_CHALLENGE_LEN);
    }
}
