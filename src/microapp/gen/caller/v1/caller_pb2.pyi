from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CallExternalRequest(_message.Message):
    __slots__ = ("url",)
    URL_FIELD_NUMBER: _ClassVar[int]
    url: str
    def __init__(self, url: _Optional[str] = ...) -> None: ...

class CallExternalResponse(_message.Message):
    __slots__ = ("status_code", "body_length")
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    BODY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    status_code: int
    body_length: int
    def __init__(self, status_code: _Optional[int] = ..., body_length: _Optional[int] = ...) -> None: ...
