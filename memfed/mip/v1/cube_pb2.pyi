import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CubeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CUBE_KIND_UNSPECIFIED: _ClassVar[CubeKind]
    CUBE_KIND_LORA: _ClassVar[CubeKind]
    CUBE_KIND_ADAPTER: _ClassVar[CubeKind]
    CUBE_KIND_EDIT: _ClassVar[CubeKind]
    CUBE_KIND_STEERING: _ClassVar[CubeKind]
    CUBE_KIND_PLAINTEXT: _ClassVar[CubeKind]
    CUBE_KIND_EDITOR: _ClassVar[CubeKind]

class LifecycleState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIFECYCLE_STATE_UNSPECIFIED: _ClassVar[LifecycleState]
    LIFECYCLE_STATE_GENERATED: _ClassVar[LifecycleState]
    LIFECYCLE_STATE_ACTIVATED: _ClassVar[LifecycleState]
    LIFECYCLE_STATE_MERGED: _ClassVar[LifecycleState]
    LIFECYCLE_STATE_ARCHIVED: _ClassVar[LifecycleState]
    LIFECYCLE_STATE_EXPIRED: _ClassVar[LifecycleState]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]
    PRIORITY_NORMAL: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]
    PRIORITY_CRITICAL: _ClassVar[Priority]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_F32: _ClassVar[DType]
    DTYPE_F16: _ClassVar[DType]
    DTYPE_BF16: _ClassVar[DType]
    DTYPE_F64: _ClassVar[DType]
    DTYPE_I8: _ClassVar[DType]
    DTYPE_U8: _ClassVar[DType]
    DTYPE_I32: _ClassVar[DType]
    DTYPE_I64: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
CUBE_KIND_UNSPECIFIED: CubeKind
CUBE_KIND_LORA: CubeKind
CUBE_KIND_ADAPTER: CubeKind
CUBE_KIND_EDIT: CubeKind
CUBE_KIND_STEERING: CubeKind
CUBE_KIND_PLAINTEXT: CubeKind
CUBE_KIND_EDITOR: CubeKind
LIFECYCLE_STATE_UNSPECIFIED: LifecycleState
LIFECYCLE_STATE_GENERATED: LifecycleState
LIFECYCLE_STATE_ACTIVATED: LifecycleState
LIFECYCLE_STATE_MERGED: LifecycleState
LIFECYCLE_STATE_ARCHIVED: LifecycleState
LIFECYCLE_STATE_EXPIRED: LifecycleState
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LOW: Priority
PRIORITY_NORMAL: Priority
PRIORITY_HIGH: Priority
PRIORITY_CRITICAL: Priority
DTYPE_UNSPECIFIED: DType
DTYPE_F32: DType
DTYPE_F16: DType
DTYPE_BF16: DType
DTYPE_F64: DType
DTYPE_I8: DType
DTYPE_U8: DType
DTYPE_I32: DType
DTYPE_I64: DType
DTYPE_BOOL: DType

class Origin(_message.Message):
    __slots__ = ("method", "description", "sources", "federated_round", "contributors", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_ROUND_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    method: str
    description: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    federated_round: int
    contributors: _containers.RepeatedScalarFieldContainer[str]
    params: _containers.ScalarMap[str, str]
    def __init__(self, method: _Optional[str] = ..., description: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ..., federated_round: _Optional[int] = ..., contributors: _Optional[_Iterable[str]] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Grant(_message.Message):
    __slots__ = ("principal", "actions", "expires_at")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    principal: str
    actions: _containers.RepeatedScalarFieldContainer[str]
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, principal: _Optional[str] = ..., actions: _Optional[_Iterable[str]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AccessControl(_message.Message):
    __slots__ = ("grants",)
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    def __init__(self, grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ...) -> None: ...

class BaseModelFingerprint(_message.Message):
    __slots__ = ("architecture", "model_type", "name", "config_digest", "shapes_digest", "sample_seed", "weight_sample", "num_parameters", "fingerprint_id")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SHAPES_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    model_type: str
    name: str
    config_digest: bytes
    shapes_digest: bytes
    sample_seed: int
    weight_sample: _containers.RepeatedScalarFieldContainer[float]
    num_parameters: int
    fingerprint_id: str
    def __init__(self, architecture: _Optional[str] = ..., model_type: _Optional[str] = ..., name: _Optional[str] = ..., config_digest: _Optional[bytes] = ..., shapes_digest: _Optional[bytes] = ..., sample_seed: _Optional[int] = ..., weight_sample: _Optional[_Iterable[float]] = ..., num_parameters: _Optional[int] = ..., fingerprint_id: _Optional[str] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class LoraTarget(_message.Message):
    __slots__ = ("module", "rank", "alpha", "scaling")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    module: str
    rank: int
    alpha: float
    scaling: float
    def __init__(self, module: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., scaling: _Optional[float] = ...) -> None: ...

class LoraSpec(_message.Message):
    __slots__ = ("rank", "alpha", "target_modules", "targets", "use_rslora", "fan_in_fan_out", "dropout")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    FAN_IN_FAN_OUT_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    targets: _containers.RepeatedCompositeFieldContainer[LoraTarget]
    use_rslora: bool
    fan_in_fan_out: bool
    dropout: float
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., targets: _Optional[_Iterable[_Union[LoraTarget, _Mapping]]] = ..., use_rslora: _Optional[bool] = ..., fan_in_fan_out: _Optional[bool] = ..., dropout: _Optional[float] = ...) -> None: ...

class AdapterSpec(_message.Message):
    __slots__ = ("bottleneck_dim", "target_modules", "activation")
    BOTTLENECK_DIM_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    bottleneck_dim: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    activation: str
    def __init__(self, bottleneck_dim: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., activation: _Optional[str] = ...) -> None: ...

class PayloadDescription(_message.Message):
    __slots__ = ("dtype", "size_bytes", "tensors", "lora", "adapter", "source_config_json", "source_format")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    size_bytes: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    lora: LoraSpec
    adapter: AdapterSpec
    source_config_json: str
    source_format: str
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., size_bytes: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., lora: _Optional[_Union[LoraSpec, _Mapping]] = ..., adapter: _Optional[_Union[AdapterSpec, _Mapping]] = ..., source_config_json: _Optional[str] = ..., source_format: _Optional[str] = ...) -> None: ...

class CubeManifest(_message.Message):
    __slots__ = ("format_version", "cube_id", "version", "digest", "version_chain", "created_at", "origin", "owner", "access_control", "ttl_seconds", "priority", "tags", "kind", "base_model", "payload", "lifecycle", "annotations")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CUBE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    VERSION_CHAIN_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ACCESS_CONTROL_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    cube_id: str
    version: str
    digest: str
    version_chain: _containers.RepeatedScalarFieldContainer[str]
    created_at: _timestamp_pb2.Timestamp
    origin: Origin
    owner: str
    access_control: AccessControl
    ttl_seconds: int
    priority: Priority
    tags: _containers.RepeatedScalarFieldContainer[str]
    kind: CubeKind
    base_model: BaseModelFingerprint
    payload: PayloadDescription
    lifecycle: LifecycleState
    annotations: _containers.ScalarMap[str, str]
    def __init__(self, format_version: _Optional[int] = ..., cube_id: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., version_chain: _Optional[_Iterable[str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., origin: _Optional[_Union[Origin, _Mapping]] = ..., owner: _Optional[str] = ..., access_control: _Optional[_Union[AccessControl, _Mapping]] = ..., ttl_seconds: _Optional[int] = ..., priority: _Optional[_Union[Priority, str]] = ..., tags: _Optional[_Iterable[str]] = ..., kind: _Optional[_Union[CubeKind, str]] = ..., base_model: _Optional[_Union[BaseModelFingerprint, _Mapping]] = ..., payload: _Optional[_Union[PayloadDescription, _Mapping]] = ..., lifecycle: _Optional[_Union[LifecycleState, str]] = ..., annotations: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SignedManifest(_message.Message):
    __slots__ = ("manifest", "key_id", "algorithm", "signature")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    key_id: str
    algorithm: str
    signature: bytes
    def __init__(self, manifest: _Optional[bytes] = ..., key_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...
