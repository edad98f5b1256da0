"""What travels in a round, as Flower records: tensors in ArrayRecords, proofs in ConfigRecords.

Arrays cross as Flower ``Array``s (NumPy's ``.npy`` encoding with ``allow_pickle=False``), never pickle.
Every reply is signed with the node's Ed25519 identity over a statement that names the cube, the version
it trained on, the round, the server's fresh nonce for that round and a digest of the update's tensors,
so an update cannot be moved to another node, cube, round or version (a replayed update from an earlier
round fails on the round and nonce), and the registry's access control decides on a proven principal.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import Array, ArrayRecord, ConfigRecord

from memfed.errors import AuthenticationError, InvalidArgumentError

if TYPE_CHECKING:  # torch only where tensors are handled: the admission handshake never loads it
    import torch

    from memfed.fed.aggregate import Factors

HELLO_DOMAIN = b"memfed fed hello v1\0"
UPDATE_DOMAIN = b"memfed fed update v1\0"
# Record keys inside a message's RecordDict.
GLOBAL_KEY, CONFIG_KEY, UPDATE_KEY, METRICS_KEY, PROOF_KEY = "global", "config", "update", "metrics", "proof"
NUM_EXAMPLES = "num-examples"


def factors_to_record(factors: Factors) -> ArrayRecord:
    """{module: (A, B)} as an ArrayRecord keyed ``<module>.lora_A.weight`` / ``.lora_B.weight``."""
    state: dict[str, torch.Tensor] = {}
    for module in sorted(factors):
        a, b = factors[module]
        state[f"{module}.lora_A.weight"] = a.detach().float().contiguous()
        state[f"{module}.lora_B.weight"] = b.detach().float().contiguous()
    return ArrayRecord(torch_state_dict=state)


ArrayRecordLike = ArrayRecord | Mapping[str, np.ndarray]


def record_arrays(record: ArrayRecordLike) -> dict[str, np.ndarray]:
    """Every tensor of ``record`` as NumPy, decoded once (each ``Array.numpy()`` parses its .npy
    header again, which was most of the server's per-update cost when done twice per update)."""
    if isinstance(record, ArrayRecord):
        return {k: _decode(record[k]) for k in record}
    return dict(record)


_NPY_MAGIC = b"\x93NUMPY"


def _decode(array: Array) -> np.ndarray:
    """An ``Array``'s .npy bytes as a read-only NumPy view, without ``np.load``'s header parsing
    (``ast.literal_eval`` per tensor). Only the layout Flower writes (C order, a dtype NumPy names) is
    read directly; anything else goes through ``Array.numpy()``. A size that does not fit the declared
    shape raises InvalidArgumentError."""
    data = array.data
    if array.stype != "numpy.ndarray" or not isinstance(data, bytes) or data[:6] != _NPY_MAGIC:
        return array.numpy()
    major = data[6]
    size = 2 if major == 1 else 4
    offset = 8 + size + int.from_bytes(data[8 : 8 + size], "little")
    header = data[8 + size : offset]
    if b"'fortran_order': False" not in header:
        return array.numpy()
    try:
        dtype = np.dtype(array.dtype)
        if dtype.hasobject:
            raise InvalidArgumentError("an update tensor has an object dtype")
        if f"'descr': '{dtype.str}'".encode() not in header:  # the header's dtype is the declared one
            return array.numpy()
        return np.frombuffer(data, dtype=dtype, offset=offset).reshape(tuple(array.shape))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"an update tensor does not fit its declared shape: {exc}") from exc


def record_to_factors(record: ArrayRecordLike) -> Factors:
    """The inverse of ``factors_to_record``; InvalidArgumentError for stray or unpaired tensors."""
    import torch

    arrays = record_arrays(record)
    out: Factors = {}
    for key in sorted(arrays):
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            b = arrays.get(f"{module}.lora_B.weight")
            if b is None:
                raise InvalidArgumentError(f"update has A but no B for module {module!r}")
            out[module] = (torch.from_numpy(np.array(arrays[key])), torch.from_numpy(np.array(b)))
        elif not key.endswith(".lora_B.weight"):
            raise InvalidArgumentError(f"update holds a tensor that is no LoRA factor: {key!r}")
    if len(out) * 2 != len(arrays):
        raise InvalidArgumentError("update holds a B factor without its A")
    return out


def tensors_digest(record: ArrayRecordLike) -> bytes:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: what a signature covers."""
    arrays = record_arrays(record)
    h = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        h.update(key.encode() + b"\0" + str(arr.dtype).encode() + b"\0")
        h.update(struct.pack(f"<{arr.ndim}Q", *arr.shape))
        h.update(arr.tobytes())
    return h.digest()


@dataclass(frozen=True)
class RoundTicket:
    """What a node's update is bound to: the cube, the version it trained on, the round and the nonce."""

    cube_id: str
    base_digest: str
    server_round: int
    nonce: bytes

    def statement(self, principal: str, update_digest: bytes) -> bytes:
        fields = (self.cube_id, self.base_digest, str(self.server_round), principal)
        return UPDATE_DOMAIN + b"\0".join(f.encode() for f in fields) + b"\0" + self.nonce + update_digest


def hello_statement(principal: str, challenge: bytes) -> bytes:
    """What a node signs to prove it holds the key of ``principal`` (a fresh challenge each session)."""
    return HELLO_DOMAIN + principal.encode() + b"\0" + challenge


def sign_proof(key: ed25519.Ed25519PrivateKey, principal: str, statement: bytes) -> ConfigRecord:
    return ConfigRecord(
        {
            "principal": principal,
            "public-key": key.public_key().public_bytes_raw(),
            "signature": key.sign(statement),
        }
    )


def read_proof(proof: Mapping[str, object]) -> tuple[str, ed25519.Ed25519PublicKey, bytes]:
    """(principal, public key, signature) of a proof record; AuthenticationError when malformed."""
    principal, raw, sig = proof.get("principal"), proof.get("public-key"), proof.get("signature")
    if not isinstance(principal, str) or not principal:
        raise AuthenticationError("the reply names no principal")
    if not isinstance(raw, bytes) or not isinstance(sig, bytes):
        raise AuthenticationError(f"the reply of {principal!r} carries no public key or signature")
    try:
        return principal, ed25519.Ed25519PublicKey.from_public_bytes(raw), sig
    except ValueError as exc:
        raise AuthenticationError(f"the public key of {principal!r} is malformed") from exc


def check_signature(key: ed25519.Ed25519PublicKey, signature: bytes, statement: bytes, who: str) -> None:
    try:
        key.verify(signature, statement)
    except InvalidSignature as exc:
        raise AuthenticationError(
            f"the signature of {who!r} does not verify",
            hint="the reply was altered, replayed from another round, or signed with another key",
        ) from exc
