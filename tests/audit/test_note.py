from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from app.audit import note
from app.audit.merkle import (
    consistency_proof_from_leaves,
    inclusion_proof_from_leaves,
    leaf_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)
from app.audit.note import (
    MAX_NOTE_BYTES,
    BadSignature,
    Checkpoint,
    MalformedCheckpoint,
    MalformedKey,
    MalformedNote,
    NoteError,
    UnknownKey,
    Verifier,
    format_signer_key,
    format_verifier_key,
    key_id,
    open_note,
    parse_signer_key,
    parse_verifier_key,
    sign_note,
)

# The example of golang.org/x/mod/sumdb/note (package documentation and note_test.go, BSD-3),
# the reference implementation of c2sp.org/signed-note. Ed25519 signatures are deterministic,
# so signing TEXT with PETER_SKEY must reproduce PETER_SIG byte for byte.
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfq"
    "dngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGw"
    "nWLox33WWd1RvMc+QQ=\n"
)
PETER_NOTE = TEXT + "\n" + PETER_SIG

# A real checkpoint of the Go checksum database, signed with its published key, from
# google/trillian-examples formats/log/checkpoint_test.go (TestSumDBNoteParsing).
SUMDB_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_NOTE = (
    "go.sum database tree\n"
    "6476701\n"
    "mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=\n"
    "\n"
    "— sum.golang.org Az3grsLX85Gz+s1SiTbgkuqxgItqFq7gsMUEyVnrsa9LM7Us9S+1xbFIGu95949rj4nPRYfvi"
    "mWEPWL+o3GeoWwOoAw=\n"
)

# The example of c2sp.org/tlog-checkpoint, without its signature line.
SPEC_CHECKPOINT = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
)

PETER = parse_verifier_key(PETER_VKEY)
ENOCH = parse_verifier_key(ENOCH_VKEY)


def test_exceptions_form_one_tree() -> None:
    for exc in (MalformedKey, MalformedNote, UnknownKey, BadSignature, MalformedCheckpoint):
        assert issubclass(exc, NoteError)


# --- keys ----------------------------------------------------------------------------------------


def test_reference_keys_parse_and_format_back() -> None:
    assert PETER.name == "PeterNeumann"
    assert PETER.key_id == bytes.fromhex("c74f20a3")
    name, signing_key = parse_signer_key(PETER_SKEY)
    assert name == "PeterNeumann"
    assert bytes(signing_key.verify_key) == PETER.public_key
    assert format_signer_key(name, signing_key) == PETER_SKEY
    assert format_verifier_key(name, signing_key.verify_key) == PETER_VKEY
    assert key_id("EnochRoot", ENOCH.public_key).hex() == "af0cfe78"


def test_a_base64_key_containing_plus_parses() -> None:
    verifier = parse_verifier_key(SUMDB_VKEY)
    assert "+" in SUMDB_VKEY.split("+", 2)[2]
    assert verifier.name == "sum.golang.org"


def manglings(key: str) -> list[str]:
    """Every proper substring and every one-character increment, as in sumdb/note's tests."""
    cut = [key[i:j] for i in range(len(key) + 1) for j in range(i + 1, len(key) + 1)]
    bumped = [key[:i] + chr(ord(key[i]) + 1) + key[i + 1 :] for i in range(len(key))]
    return [k for k in cut + bumped if k != key]


def test_every_mangled_verifier_key_is_refused() -> None:
    for mangled in manglings(PETER_VKEY):
        with pytest.raises(MalformedKey):
            parse_verifier_key(mangled)


def test_every_mangled_signer_key_is_refused() -> None:
    for mangled in manglings(PETER_SKEY):
        with pytest.raises(MalformedKey):
            parse_signer_key(mangled)


@pytest.mark.parametrize(
    "vkey",
    [
        # From sumdb/note's TestNewVerifier: key ID adjusted to match, but the wrong key length ...
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
        # ... and an unknown algorithm byte.
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # uppercase ID
        "PeterNeumann+0xc74f20+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW\n",
        "",
    ],
)
def test_malformed_verifier_keys_are_refused(vkey: str) -> None:
    with pytest.raises(MalformedKey):
        parse_verifier_key(vkey)


@pytest.mark.parametrize("name", ["", "a+b", "a b", "a\u00a0b", "a\tb", "a\x00b", "\ud800"])
def test_invalid_key_names_are_refused(name: str) -> None:
    key = SigningKey(bytes(32))
    with pytest.raises(MalformedKey):
        Verifier(name, bytes(key.verify_key))
    with pytest.raises(MalformedKey):
        format_signer_key(name, key)
    with pytest.raises(MalformedKey):
        sign_note(TEXT, name, key)


def test_a_verifier_needs_a_32_byte_key() -> None:
    with pytest.raises(MalformedKey):
        Verifier("a", bytes(31))


# --- the reference note --------------------------------------------------------------------------


def test_reference_note_opens() -> None:
    assert open_note(PETER_NOTE, [PETER]) == (TEXT, ["PeterNeumann"])
    assert open_note(PETER_NOTE.encode(), [ENOCH, PETER]) == (TEXT, ["PeterNeumann"])


def test_signing_reproduces_the_reference_note() -> None:
    name, signing_key = parse_signer_key(PETER_SKEY)
    assert sign_note(TEXT, name, signing_key) == PETER_NOTE


def test_doubly_signed_note() -> None:
    both = TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert open_note(both, [PETER, ENOCH]) == (TEXT, ["PeterNeumann", "EnochRoot"])
    # Signatures by keys the caller does not trust are ignored, as the spec requires.
    assert open_note(both, [ENOCH]) == (TEXT, ["EnochRoot"])
    with pytest.raises(UnknownKey):
        open_note(both, [])


def test_repeated_signatures_count_once() -> None:
    repeated = TEXT + "\n" + PETER_SIG + ENOCH_SIG + PETER_SIG + ENOCH_SIG
    assert open_note(repeated, [PETER, ENOCH]) == (TEXT, ["PeterNeumann", "EnochRoot"])


def test_sharing_only_a_name_or_only_a_key_id_with_a_trusted_key_is_unknown() -> None:
    misnamed = TEXT + "\n" + PETER_SIG.replace("PeterNeumann", "CarmenSandiego")
    wrong_id = TEXT + "\n" + PETER_SIG.replace("x08g", "xxxx")
    for msg in (misnamed, wrong_id):
        with pytest.raises(UnknownKey):
            open_note(msg, [PETER])


def test_a_bad_signature_by_a_trusted_key_refuses_the_whole_note() -> None:
    lengthened = TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    # Same length, one signature byte changed.
    altered = TEXT + "\n" + PETER_SIG.replace("ZJkuBS9U", "ZJkuBS9V")
    truncated = TEXT + "\n" + "— PeterNeumann x08go/Y=\n"  # key ID and one byte
    for msg in (lengthened, altered, altered + ENOCH_SIG, truncated):
        with pytest.raises(BadSignature, match="PeterNeumann"):
            open_note(msg, [PETER, ENOCH])


def test_changed_text_does_not_verify() -> None:
    with pytest.raises(BadSignature):
        open_note(PETER_NOTE.replace("problem,", "problem;"), [PETER])


def test_the_signature_of_an_untrusted_key_is_not_checked() -> None:
    altered_enoch = ENOCH_SIG.replace("rwz+eBzm", "rwz+eBzn")
    assert open_note(TEXT + "\n" + PETER_SIG + altered_enoch, [PETER])[1] == ["PeterNeumann"]


@pytest.mark.parametrize(
    "msg",
    [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],  # no final newline
        "\x01" + PETER_NOTE,
        PETER_NOTE.replace("\n", "\r\n"),
        TEXT + "\n" + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSN",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        TEXT + "\n" + PETER_SIG.replace("— ", "- "),  # hyphen, not em dash
        TEXT + "\n" + PETER_SIG.replace("— ", "—"),
        TEXT + "\n" + PETER_SIG.replace("=\n", "\n"),  # unpadded base64
        TEXT + "\n" + PETER_SIG.replace("AM=\n", "AN=\n"),  # non-canonical trailing bits
        TEXT + "\n" + PETER_SIG.replace(" x08go", "  x08go"),
        TEXT + "\n" + PETER_SIG.replace("=\n", "= \n"),
        TEXT + "\n" + "— PeterNeumann x08gow==\n",  # four bytes: a key ID but no signature
        TEXT + "\n" + "— PeterNeumann\n",
        TEXT + "\n" + PETER_SIG * (note.MAX_SIGNATURES + 1),
        "x" * MAX_NOTE_BYTES + "\n\n" + PETER_SIG,
        "\ud800" + PETER_NOTE,  # a lone surrogate cannot be UTF-8
    ],
)
def test_malformed_notes_are_refused(msg: str) -> None:
    with pytest.raises(MalformedNote):
        open_note(msg, [PETER])


@pytest.mark.parametrize(
    "raw", [b"\xff" + PETER_NOTE.encode(), PETER_NOTE.encode()[:-3] + b"\xc3\n"]
)
def test_invalid_utf8_is_refused(raw: bytes) -> None:
    with pytest.raises(MalformedNote):
        open_note(raw, [PETER])


def test_the_maximum_number_of_signatures_is_accepted() -> None:
    msg = TEXT + "\n" + PETER_SIG * note.MAX_SIGNATURES
    assert open_note(msg, [PETER]) == (TEXT, ["PeterNeumann"])


class CollidingVerifier(Verifier):
    """A different key that claims Peter's ID: finding a real 32-bit collision takes hours."""

    @property
    def key_id(self) -> bytes:
        return PETER.key_id


def test_conflicting_verifiers_are_a_configuration_error() -> None:
    assert open_note(PETER_NOTE, [PETER, parse_verifier_key(PETER_VKEY)])[1] == ["PeterNeumann"]
    with pytest.raises(ValueError, match="ambiguous"):
        open_note(PETER_NOTE, [PETER, CollidingVerifier("PeterNeumann", ENOCH.public_key)])


@pytest.mark.parametrize("text", ["no newline", "", "tab\there\n", "cr\r\n", "\udc80\n"])
def test_sign_note_refuses_malformed_text(text: str) -> None:
    with pytest.raises(MalformedNote):
        sign_note(text, "example.com/log", SigningKey(bytes(32)))


def test_sign_note_refuses_text_open_note_would_refuse() -> None:
    with pytest.raises(MalformedNote, match="too long"):
        sign_note("x" * MAX_NOTE_BYTES + "\n", "example.com/log", SigningKey(bytes(32)))


note_lines = st.text(
    alphabet=st.characters(min_codepoint=0x20, exclude_categories=["Cs"]), max_size=30
)


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(note_lines, min_size=1, max_size=6), st.binary(min_size=32, max_size=32))
def test_any_text_round_trips(lines: list[str], seed: bytes) -> None:
    # Empty lines and lines that look like signatures included: the last blank line separates.
    text = "\n".join(lines) + "\n"
    key = SigningKey(seed)
    signed = sign_note(text, "example.com/log", key)
    verifier = parse_verifier_key(format_verifier_key("example.com/log", key.verify_key))
    assert open_note(signed, [verifier]) == (text, ["example.com/log"])


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_layout_matches_the_spec_example() -> None:
    root_hash = base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    checkpoint = Checkpoint("example.com/behind-the-sofa", 20852163, root_hash)
    assert checkpoint.format() == SPEC_CHECKPOINT
    assert Checkpoint.parse(SPEC_CHECKPOINT) == checkpoint


def test_checkpoint_extension_lines() -> None:
    checkpoint = Checkpoint("o", 0, bytes(32), ("ext one", "— ext two"))
    text = checkpoint.format()
    assert text == "o\n0\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\next one\n— ext two\n"
    assert Checkpoint.parse(text) == checkpoint


def test_a_real_signed_checkpoint_opens_and_parses() -> None:
    text, signers = open_note(SUMDB_NOTE, [parse_verifier_key(SUMDB_VKEY)])
    assert signers == ["sum.golang.org"]
    checkpoint = Checkpoint.parse(text)
    assert (checkpoint.origin, checkpoint.size, checkpoint.extensions) == (
        "go.sum database tree",
        6476701,
        (),
    )
    assert checkpoint.format() == text


ROOT_B64 = "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        f"origin\n5\n{ROOT_B64}",  # no final newline
        "origin\n5\n",
        f"\n5\n{ROOT_B64}\n",
        f"origin\n05\n{ROOT_B64}\n",
        f"origin\n+5\n{ROOT_B64}\n",
        f"origin\n-5\n{ROOT_B64}\n",
        f"origin\n 5\n{ROOT_B64}\n",
        f"origin\n5 \n{ROOT_B64}\n",
        f"origin\n\u0665\n{ROOT_B64}\n",  # ARABIC-INDIC DIGIT FIVE: int() would take it
        f"origin\n1_000\n{ROOT_B64}\n",
        f"origin\n{2**64}\n{ROOT_B64}\n",
        f"origin\n{'9' * 5000}\n{ROOT_B64}\n",  # past what int() converts: a ValueError
        f"origin\n\n{ROOT_B64}\n",
        "origin\n5\n\n",
        f"origin\n5\n{ROOT_B64.rstrip('=')}\n",
        "origin\n5\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2J=\n",  # non-canonical
        f"origin\n5\n{base64.b64encode(bytes(31)).decode()}\n",
        f"origin\n5\n{base64.b64encode(bytes(33)).decode()}\n",
        f"origin\n5\n{ROOT_B64}\n\n",  # empty extension line
        f"origin\n5\n{ROOT_B64}\next\n\nmore\n",
        f"orig\tin\n5\n{ROOT_B64}\n",
        f"origin\r\n5\n{ROOT_B64}\n",
    ],
)
def test_malformed_checkpoints_are_refused(text: str) -> None:
    with pytest.raises(MalformedCheckpoint):
        Checkpoint.parse(text)


def test_largest_tree_size_parses() -> None:
    assert Checkpoint.parse(f"o\n{2**64 - 1}\n{ROOT_B64}\n").size == 2**64 - 1


@pytest.mark.parametrize(
    ("origin", "size", "root_hash", "extensions"),
    [
        ("", 1, bytes(32), ()),
        ("two\nlines", 1, bytes(32), ()),
        ("o", -1, bytes(32), ()),
        ("o", 2**64, bytes(32), ()),
        ("o", True, bytes(32), ()),
        ("o", 1, bytes(31), ()),
        ("o", 1, bytes(32), ("",)),
        ("o", 1, bytes(32), ("a\nb",)),
    ],
)
def test_invalid_checkpoints_cannot_be_built(
    origin: str, size: int, root_hash: bytes, extensions: tuple[str, ...]
) -> None:
    with pytest.raises(MalformedCheckpoint):
        Checkpoint(origin, size, root_hash, extensions)


def test_signed_checkpoint_end_to_end() -> None:
    """What a witness does: open two checkpoints of our log, check they are consistent."""
    key = SigningKey(bytes(range(32)))
    origin = "entraide.example/node-a"
    verifier = parse_verifier_key(format_verifier_key(origin, key.verify_key))
    entries = [leaf_hash(f"entry {i}".encode()) for i in range(21)]

    notes = [
        sign_note(
            Checkpoint(origin, size, root_from_leaf_hashes(entries[:size])).format(), origin, key
        )
        for size in (13, 21)
    ]
    old, new = (Checkpoint.parse(open_note(n, [verifier])[0]) for n in notes)
    proof = consistency_proof_from_leaves(old.size, entries[: new.size])
    assert verify_consistency(old.size, new.size, old.root_hash, new.root_hash, proof)
    inclusion = inclusion_proof_from_leaves(7, entries[: new.size])
    assert verify_inclusion(entries[7], 7, new.size, inclusion, new.root_hash)
