from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GreetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GreetResponse(_message.Message):
    __slots__ = ("message", "external_status", "external_body_length")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_STATUS_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_BODY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    message: str
    external_status: int
    external_body_length: int
    def __init__(self, message: _Optional[str] = ..., external_status: _Optional[int] = ..., external_body_length: _Optional[int] = ...) -> None: ...
