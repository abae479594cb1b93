from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GreetRequest(_message.Message):
    __slots__ = ("name", "locale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    locale: str
    def __init__(self, name: _Optional[str] = ..., locale: _Optional[str] = ...) -> None: ...

class GreetResponse(_message.Message):
    __slots__ = ("message", "external_status", "external_body_length", "trace_id")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_STATUS_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_BODY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    message: str
    external_status: int
    external_body_length: int
    trace_id: str
    def __init__(self, message: _Optional[str] = ..., external_status: _Optional[int] = ..., external_body_length: _Optional[int] = ..., trace_id: _Optional[str] = ...) -> None: ...

class GreetStreamRequest(_message.Message):
    __slots__ = ("name", "locale", "count", "interval_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOCALE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    locale: str
    count: int
    interval_ms: int
    def __init__(self, name: _Optional[str] = ..., locale: _Optional[str] = ..., count: _Optional[int] = ..., interval_ms: _Optional[int] = ...) -> None: ...

class GreetStreamResponse(_message.Message):
    __slots__ = ("message", "sequence", "external_status", "external_body_length", "trace_id")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_STATUS_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_BODY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    message: str
    sequence: int
    external_status: int
    external_body_length: int
    trace_id: str
    def __init__(self, message: _Optional[str] = ..., sequence: _Optional[int] = ..., external_status: _Optional[int] = ..., external_body_length: _Optional[int] = ..., trace_id: _Optional[str] = ...) -> None: ...
