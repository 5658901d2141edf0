"""Messages exchanged in a request's conversation after the request itself.

Each is sealed and signed like the request, so the same strictness applies. Lifecycle states
(accepted, refused, executed, ...) belong to the conversation layer that carries these
messages; the message itself stays a typed, bounded text.
"""

from enum import StrEnum
from typing import Literal

from app.domain.document import DomainModel, LongText, References


class MessageType(StrEnum):
    ACKNOWLEDGEMENT = "acknowledgement"
    ADDITIONAL_INFORMATION_REQUEST = "additional_information_request"
    ADDITIONAL_INFORMATION = "additional_information"
    CONSULTATION = "consultation"
    STATUS_QUERY = "status_query"
    STATUS_ANSWER = "status_answer"
    RESULT = "result"
    NOTE = "note"


class MessageDocument(DomainModel):
    schema_version: Literal[1] = 1
    type: MessageType
    text: LongText
    references: References | None = None
