"""The request document, following UNTOC art. 18(15) and UNCAC art. 46(15).

This is the plaintext sealed inside an envelope, and on the receiving side it comes from a peer
that may be broken or hostile. So every model refuses unknown fields (a field we do not show an
officer must not travel unseen), every string and list has a ceiling, and validation errors
never echo the input in their text (it is confidential case content that would end up in logs).

Cross-field rules report the field at fault (`("urgency", "reason")`, not the model), so an
authority's case-management system can point its user at the box to fix. Field meanings and
legal sources: docs/domain.md.
"""

import datetime as dt
from collections import Counter
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

# Control characters break logs, terminals and some databases (PostgreSQL refuses NUL), and have
# no place in a legal document; free text may keep tabs and line breaks.
_ONE_LINE = r"^[^\x00-\x1f\x7f]*$"
_MULTI_LINE = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"


def _line(max_length: int) -> StringConstraints:
    return StringConstraints(
        strip_whitespace=True, min_length=1, max_length=max_length, pattern=_ONE_LINE
    )


def _text(max_length: int) -> StringConstraints:
    return StringConstraints(
        strip_whitespace=True, min_length=1, max_length=max_length, pattern=_MULTI_LINE
    )


Label = Annotated[str, _line(300)]
Reference = Annotated[str, _line(64)]
Text = Annotated[str, _text(4_000)]
LongText = Annotated[str, _text(20_000)]

AuthorityId = Annotated[
    str, StringConstraints(max_length=35, pattern=r"^[A-Z]{2}/[A-Z0-9_-]{1,32}$")
]
# ISO 3166-1 alpha-2.
CountryCode = Annotated[str, StringConstraints(min_length=2, max_length=2, pattern=r"^[A-Z]{2}$")]
# The BCP 47 subset authorities use: language, optional script, optional region ("es",
# "es-AR", "es-419", "zh-Hant-TW"). Full BCP 47 (variants, extensions) buys nothing here.
LanguageTag = Annotated[
    str,
    StringConstraints(
        max_length=16, pattern=r"^[a-z]{2,3}(-[A-Z][a-z]{3})?(-([A-Z]{2}|[0-9]{3}))?$"
    ),
]
# Document-local handle that assistance items use to point at a person or a data set.
RefId = Annotated[str, StringConstraints(max_length=32, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
# Classification and handling markings ("RESTRINGIDO", "TLP:AMBER+STRICT", "NO_TIPPING_OFF").
Code = Annotated[str, StringConstraints(max_length=32, pattern=r"^[A-Z0-9][A-Z0-9:_+-]*$")]
Email = Annotated[
    str,
    StringConstraints(
        max_length=254,
        pattern=r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$",
    ),
]
# E.164: one unambiguous form, since officers in different countries write numbers differently.
Phone = Annotated[str, StringConstraints(max_length=16, pattern=r"^\+[1-9][0-9]{6,14}$")]

Loc = tuple[str | int, ...]


def _integer_only(value: object) -> object:
    # JSON `true` and `1.0` equal 1 in Python, and pydantic's lax mode takes them for it.
    if type(value) is not int:
        raise PydanticCustomError("int_type", "a version number is an integer")
    return value


# Only version 1 exists; `true` or `1.0` (which equal 1 in Python) are not versions.
SchemaVersion = Annotated[Literal[1], BeforeValidator(_integer_only)]


class DomainModel(BaseModel):
    """Base of every domain model: strict, immutable, and silent about the input it refuses."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def _reject(model: BaseModel, problems: Iterable[tuple[Loc, str, str, object]]) -> None:
    """Raise one validation error per (location, code, message, input), located under `model`.

    Raising `ValidationError` from a validator is what keeps the location field-level: pydantic
    prefixes it with the path to `model` instead of pinning the error on the model as a whole.
    """
    details = [
        InitErrorDetails(type=PydanticCustomError(code, message), loc=loc, input=value)
        for loc, code, message, value in problems
    ]
    if details:
        raise ValidationError.from_exception_data(type(model).__name__, details)


class LegalBasisInstrument(StrEnum):
    UNTOC_13 = "UNTOC_13"
    UNTOC_16 = "UNTOC_16"
    UNTOC_18 = "UNTOC_18"
    UNTOC_21 = "UNTOC_21"
    UNCAC_44 = "UNCAC_44"
    UNCAC_46 = "UNCAC_46"
    UNCAC_47 = "UNCAC_47"
    UNCAC_55 = "UNCAC_55"
    VIENNA_1988 = "VIENNA_1988"
    BUDAPEST = "BUDAPEST"
    BUDAPEST_P2 = "BUDAPEST_P2"
    ECMA_1959 = "ECMA_1959"
    ECMA_1959_P2 = "ECMA_1959_P2"
    ECE_1957 = "ECE_1957"
    EU_MLA_2000 = "EU_MLA_2000"
    EU_EIO = "EU_EIO"
    EU_EAW = "EU_EAW"
    IACMA_1992 = "IACMA_1992"
    BILATERAL_TREATY = "BILATERAL_TREATY"
    RECIPROCITY = "RECIPROCITY"
    OTHER = "OTHER"


# An enum value cannot say which of a hundred bilateral treaties applies.
_NEEDS_TREATY_NAME = {LegalBasisInstrument.BILATERAL_TREATY, LegalBasisInstrument.OTHER}


class LegalBasis(DomainModel):
    instrument: LegalBasisInstrument
    article: Label | None = None
    treaty_name: Label | None = None

    @model_validator(mode="after")
    def _treaty_named(self) -> Self:
        if self.instrument in _NEEDS_TREATY_NAME and self.treaty_name is None:
            msg = "treaty_name is required when the instrument is BILATERAL_TREATY or OTHER"
            _reject(self, [(("treaty_name",), "treaty_name_required", msg, None)])
        return self


class RequestType(StrEnum):
    TAKING_EVIDENCE = "taking_evidence"
    SERVICE_OF_DOCUMENTS = "service_of_documents"
    SEARCH_AND_SEIZURE = "search_and_seizure"
    RECORDS_PRODUCTION = "records_production"
    TRACING_PROCEEDS = "tracing_proceeds"
    FREEZING_PROCEEDS = "freezing_proceeds"
    CONFISCATION = "confiscation"
    EXPEDITED_PRESERVATION = "expedited_preservation"
    EXPEDITED_DISCLOSURE = "expedited_disclosure"
    EMERGENCY_ASSISTANCE = "emergency_assistance"
    SPONTANEOUS_INFORMATION = "spontaneous_information"
    EXTRADITION = "extradition"
    PROVISIONAL_ARREST = "provisional_arrest"
    TRANSFER_OF_PROCEEDINGS = "transfer_of_proceedings"
    OTHER_MLA = "other_mla"


class Measure(StrEnum):
    """One measure of assistance; a request of one type usually asks for several."""

    TAKING_EVIDENCE = "taking_evidence"
    HEARING_BY_VIDEOCONFERENCE = "hearing_by_videoconference"
    SERVICE_OF_DOCUMENTS = "service_of_documents"
    SEARCH_AND_SEIZURE = "search_and_seizure"
    EXAMINATION_OF_OBJECTS_AND_SITES = "examination_of_objects_and_sites"
    EXPERT_EVALUATION = "expert_evaluation"
    RECORDS_PRODUCTION = "records_production"
    LOCATING_PERSONS = "locating_persons"
    SUBSCRIBER_INFORMATION = "subscriber_information"
    STORED_DATA_ACCESS = "stored_data_access"
    EXPEDITED_PRESERVATION = "expedited_preservation"
    EXPEDITED_DISCLOSURE = "expedited_disclosure"
    REALTIME_TRAFFIC_COLLECTION = "realtime_traffic_collection"
    INTERCEPTION_OF_CONTENT = "interception_of_content"
    TRACING_PROCEEDS = "tracing_proceeds"
    FREEZING_PROCEEDS = "freezing_proceeds"
    CONFISCATION = "confiscation"
    RETURN_OF_ASSETS = "return_of_assets"
    VOLUNTARY_APPEARANCE = "voluntary_appearance"
    TEMPORARY_TRANSFER_OF_DETAINEE = "temporary_transfer_of_detainee"
    PROVISIONAL_ARREST = "provisional_arrest"
    SURRENDER = "surrender"
    TRANSFER_OF_PROCEEDINGS = "transfer_of_proceedings"
    PROVISION_OF_INFORMATION = "provision_of_information"
    OTHER = "other"


# Measures that act on computer data are meaningless without saying which data, held by whom.
_DATA_MEASURES = {
    Measure.SUBSCRIBER_INFORMATION,
    Measure.STORED_DATA_ACCESS,
    Measure.EXPEDITED_PRESERVATION,
    Measure.EXPEDITED_DISCLOSURE,
    Measure.REALTIME_TRAFFIC_COLLECTION,
    Measure.INTERCEPTION_OF_CONTENT,
}


class Urgency(StrEnum):
    ROUTINE = "routine"
    URGENT = "urgent"
    EMERGENCY = "emergency"


class UrgencyDetails(DomainModel):
    level: Urgency = Urgency.ROUTINE
    reason: Text | None = None
    requested_date: dt.date | None = None

    @model_validator(mode="after")
    def _urgency_reasoned(self) -> Self:
        # UNTOC art. 18(24): the requested State heeds deadlines "for which reasons are given".
        if self.level is not Urgency.ROUTINE:
            problems: list[tuple[Loc, str, str, object]] = []
            if self.reason is None:
                msg = "an urgent or emergency request needs a reason"
                problems.append((("reason",), "urgency_reason_required", msg, None))
            if self.requested_date is None:
                msg = "an urgent or emergency request needs a requested date"
                problems.append((("requested_date",), "urgency_date_required", msg, None))
            _reject(self, problems)
        return self


class ProceedingType(StrEnum):
    INVESTIGATION = "investigation"
    PROSECUTION = "prosecution"
    TRIAL = "trial"
    APPEAL = "appeal"
    ENFORCEMENT = "enforcement"
    CONFISCATION = "confiscation"
    OTHER = "other"


class Proceeding(DomainModel):
    type: ProceedingType
    authority: Label
    file_number: Reference
    description: Text | None = None


class Offence(DomainModel):
    description: Text
    legal_provision: Label
    max_penalty: Label | None = None


class PersonRole(StrEnum):
    SUSPECT = "suspect"
    ACCUSED = "accused"
    CONVICTED_PERSON = "convicted_person"
    PERSON_SOUGHT = "person_sought"
    VICTIM = "victim"
    WITNESS = "witness"
    EXPERT = "expert"
    ACCOUNT_HOLDER = "account_holder"
    SUBSCRIBER = "subscriber"
    BENEFICIAL_OWNER = "beneficial_owner"
    PERSON_TO_BE_SERVED = "person_to_be_served"
    OTHER = "other"


class PersonKind(StrEnum):
    NATURAL = "natural"
    LEGAL = "legal"


class PersonIdentifierType(StrEnum):
    PASSPORT = "passport"
    NATIONAL_ID = "national_id"
    TAX_ID = "tax_id"
    COMPANY_REGISTRATION = "company_registration"
    BANK_ACCOUNT = "bank_account"
    PHONE = "phone"
    EMAIL = "email"
    USERNAME = "username"
    OTHER = "other"


class PersonIdentifier(DomainModel):
    type: PersonIdentifierType
    value: Annotated[str, _line(128)]
    issuing_country: CountryCode | None = None


class Address(DomainModel):
    lines: tuple[Label, ...] = Field(min_length=1, max_length=4)
    locality: Label | None = None
    postal_code: Annotated[str, _line(16)] | None = None
    country: CountryCode


class Person(DomainModel):
    ref: RefId
    role: PersonRole
    kind: PersonKind = PersonKind.NATURAL
    given_names: Label | None = None
    family_names: Label | None = None
    organisation_name: Label | None = None
    aliases: tuple[Label, ...] = Field(default=(), max_length=10)
    date_of_birth: dt.date | None = None
    place_of_birth: Label | None = None
    nationalities: tuple[CountryCode, ...] = Field(default=(), max_length=5)
    identifiers: tuple[PersonIdentifier, ...] = Field(default=(), max_length=20)
    address: Address | None = None
    notes: Text | None = None

    @model_validator(mode="after")
    def _identifiable(self) -> Self:
        if self.kind is PersonKind.LEGAL and self.organisation_name is None:
            msg = "a legal person needs an organisation_name"
            _reject(self, [(("organisation_name",), "organisation_name_required", msg, None)])
        # A suspect may be known only by an e-mail address or an alias, but a person with
        # nothing at all to identify them cannot be acted on by the requested State.
        if not (self.given_names or self.family_names or self.organisation_name) and not (
            self.aliases or self.identifiers
        ):
            msg = "a person needs a name, an alias or an identifier"
            _reject(self, [((), "person_unidentifiable", msg, None)])
        return self


class TimeRange(DomainModel):
    # Aware datetimes only: a provider resolving a dynamic IP address against a naive time is
    # off by the UTC offset, and identifies the wrong subscriber.
    start: AwareDatetime
    end: AwareDatetime

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.end < self.start:
            msg = "end must not be before start"
            _reject(self, [(("end",), "time_range_reversed", msg, self.end.isoformat())])
        return self


class DataCategory(StrEnum):
    SUBSCRIBER = "subscriber"
    TRAFFIC = "traffic"
    CONTENT = "content"
    DOMAIN_REGISTRATION = "domain_registration"
    OTHER = "other"


class DataIdentifierType(StrEnum):
    EMAIL = "email"
    PHONE_NUMBER = "phone_number"
    IP_ADDRESS = "ip_address"
    USERNAME = "username"
    ACCOUNT_ID = "account_id"
    DOMAIN_NAME = "domain_name"
    URL = "url"
    IMEI = "imei"
    IMSI = "imsi"
    DEVICE_ID = "device_id"
    OTHER = "other"


class DataIdentifier(DomainModel):
    type: DataIdentifierType
    value: Annotated[str, _line(512)]
    observed_at: AwareDatetime | None = None


class ElectronicDataSought(DomainModel):
    ref: RefId
    category: DataCategory
    identifiers: tuple[DataIdentifier, ...] = Field(min_length=1, max_length=100)
    period: TimeRange | None = None
    provider_name: Label
    provider_country: CountryCode
    preservation_reference: Reference | None = None
    description: Text | None = None


class AssistanceItem(DomainModel):
    measure: Measure
    description: Text
    procedure: Text | None = None
    person_refs: tuple[RefId, ...] = Field(default=(), max_length=200)
    data_refs: tuple[RefId, ...] = Field(default=(), max_length=100)

    @model_validator(mode="after")
    def _data_named(self) -> Self:
        if self.measure in _DATA_MEASURES and not self.data_refs:
            msg = "this measure needs data_refs naming the electronic data it applies to"
            _reject(self, [(("data_refs",), "data_refs_required", msg, None)])
        return self


class ConfidentialityLevel(StrEnum):
    STANDARD = "standard"
    NO_TIPPING_OFF = "no_tipping_off"
    NEED_TO_KNOW = "need_to_know"


class Confidentiality(DomainModel):
    # StrictBool: lax mode read `"no"`, `"0"`, `"off"` and `0` as false.
    confidential: StrictBool = True
    level: ConfidentialityLevel = ConfidentialityLevel.STANDARD
    use_limitation: Text | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.level is not ConfidentialityLevel.STANDARD and not self.confidential:
            msg = "a confidentiality level above standard requires confidential to be true"
            _reject(self, [(("confidential",), "confidentiality_inconsistent", msg, False)])
        return self


class Classification(DomainModel):
    code: Code
    handling_codes: tuple[Code, ...] = Field(default=(), max_length=16)


class References(DomainModel):
    requesting: Reference
    requested: Reference | None = None


class ContactOfficer(DomainModel):
    name: Label
    title: Label
    office: Label | None = None
    email: Email
    phone: Phone | None = None
    languages: tuple[LanguageTag, ...] = Field(min_length=1, max_length=10)


class DeadlineKind(StrEnum):
    HEARING = "hearing"
    TRIAL = "trial"
    LIMITATION_PERIOD = "limitation_period"
    PRESERVATION_EXPIRY = "preservation_expiry"
    CUSTODY_EXPIRY = "custody_expiry"
    OTHER = "other"


class Deadline(DomainModel):
    kind: DeadlineKind
    due: dt.date
    note: Label | None = None

    @model_validator(mode="after")
    def _other_explained(self) -> Self:
        if self.kind is DeadlineKind.OTHER and self.note is None:
            _reject(self, [(("note",), "note_required", "an 'other' deadline needs a note", None)])
        return self


class RequestDocument(DomainModel):
    schema_version: SchemaVersion = 1
    requesting_authority: AuthorityId
    requested_authority: AuthorityId
    request_type: RequestType
    legal_basis: tuple[LegalBasis, ...] = Field(min_length=1, max_length=10)
    proceeding: Proceeding
    offences: tuple[Offence, ...] = Field(min_length=1, max_length=50)
    summary_of_facts: LongText
    assistance_sought: tuple[AssistanceItem, ...] = Field(min_length=1, max_length=50)
    purpose: Text
    persons: tuple[Person, ...] = Field(default=(), max_length=200)
    electronic_data: tuple[ElectronicDataSought, ...] = Field(default=(), max_length=100)
    urgency: UrgencyDetails = UrgencyDetails()
    deadlines: tuple[Deadline, ...] = Field(default=(), max_length=20)
    confidentiality: Confidentiality = Confidentiality()
    classification: Classification | None = None
    references: References
    contact_officer: ContactOfficer
    language: LanguageTag

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        _reject(self, self._problems())
        return self

    def _problems(self) -> Iterable[tuple[Loc, str, str, object]]:
        if self.requested_authority == self.requesting_authority:
            msg = "an authority cannot send a request to itself"
            yield ("requested_authority",), "same_authority", msg, self.requested_authority
        yield from _duplicates("persons", [p.ref for p in self.persons])
        yield from _duplicates("electronic_data", [d.ref for d in self.electronic_data])
        person_refs = {p.ref for p in self.persons}
        data_refs = {d.ref for d in self.electronic_data}
        for i, item in enumerate(self.assistance_sought):
            for j, ref in enumerate(item.person_refs):
                if ref not in person_refs:
                    loc: Loc = ("assistance_sought", i, "person_refs", j)
                    yield loc, "unknown_person_ref", "no person has this ref", ref
            for j, ref in enumerate(item.data_refs):
                if ref not in data_refs:
                    loc = ("assistance_sought", i, "data_refs", j)
                    yield loc, "unknown_data_ref", "no electronic_data entry has this ref", ref
        if self.request_type in {RequestType.EXTRADITION, RequestType.PROVISIONAL_ARREST} and (
            all(p.role is not PersonRole.PERSON_SOUGHT for p in self.persons)
        ):
            msg = "an extradition or provisional arrest request needs a person_sought"
            yield ("persons",), "person_sought_required", msg, None
        if (
            self.request_type is RequestType.EMERGENCY_ASSISTANCE
            and self.urgency.level is not Urgency.EMERGENCY
        ):
            msg = "emergency assistance requires urgency level emergency"
            yield ("urgency", "level"), "emergency_level_required", msg, self.urgency.level.value


def _duplicates(field: str, refs: list[str]) -> Iterable[tuple[Loc, str, str, object]]:
    counts = Counter(refs)
    for i, ref in enumerate(refs):
        if counts[ref] > 1:
            yield (field, i, "ref"), "duplicate_ref", "this ref is used more than once", ref
