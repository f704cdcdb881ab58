"""Cantata: orchestration and choreography for Python services on one durable log."""

from cantata.app import App
from cantata.broker.base import Broker
from cantata.choreography.context import HandlerContext
from cantata.declare import Router
from cantata.engine.context import WorkflowContext
from cantata.engine.handle import RunHandle
from cantata.engine.heartbeat import heartbeat
from cantata.engine.hooks import Hook
from cantata.engine.http import http_step
from cantata.engine.queries import RunState
from cantata.engine.saga import Parallel, Saga, Step
from cantata.engine.stepinfo import StepInfo, step_info
from cantata.errors import (
    AmbiguousRunId,
    BrokerError,
    Cancelled,
    CantataError,
    ConfigurationError,
    DeadLetterNotFound,
    DeadlineExceeded,
    DuplicateEventId,
    EventsRefused,
    HeartbeatTimeout,
    HttpStepError,
    HttpStepRejected,
    IdempotencyConflict,
    InvalidEvent,
    LeaseLost,
    NonDeterminismError,
    NonRetryable,
    PayloadTooLarge,
    QueryFailed,
    QueueConflict,
    RegistrationError,
    ResultTimeout,
    RunInProgress,
    RunNotFound,
    RunNotRetryable,
    SagaStateTooLarge,
    SerializationError,
    SignatureInvalid,
    SignatureMissing,
    StepFailed,
    StepNotInHistory,
    StepTimeout,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreReadOnly,
    StoreUnavailable,
    TransactionUnsupported,
    UnknownAttribute,
    UnknownQueue,
    UnknownSchedule,
    UnknownStep,
    UnknownWorkflow,
    WaitTimeout,
    WorkerLost,
    WorkflowCallError,
    WorkflowCancelled,
    WorkflowCompensated,
    WorkflowError,
    WorkflowFailed,
)
from cantata.flow.schedules import ScheduleInfo
from cantata.model.event import Event
from cantata.model.flow import QueueStats, Rate
from cantata.model.records import DeadLetter, RunInfo
from cantata.model.retry import Retry
from cantata.model.status import RunStatus
from cantata.observability.node import TraceNode, TraceNotFound
from cantata.observability.stalled import Stall
from cantata.store.base import Store
from cantata.store.tx import Tx

__version__ = "0.1.0"

__all__ = [
    "AmbiguousRunId",
    "App",
    "Broker",
    "BrokerError",
    "Cancelled",
    "CantataError",
    "ConfigurationError",
    "DeadLetter",
    "DeadLetterNotFound",
    "DeadlineExceeded",
    "DuplicateEventId",
    "Event",
    "EventsRefused",
    "HandlerContext",
    "HeartbeatTimeout",
    "Hook",
    "HttpStepError",
    "HttpStepRejected",
    "IdempotencyConflict",
    "InvalidEvent",
    "LeaseLost",
    "NonDeterminismError",
    "NonRetryable",
    "Parallel",
    "PayloadTooLarge",
    "QueryFailed",
    "QueueConflict",
    "QueueStats",
    "Rate",
    "RegistrationError",
    "ResultTimeout",
    "Retry",
    "Router",
    "RunHandle",
    "RunInProgress",
    "RunInfo",
    "RunNotFound",
    "RunNotRetryable",
    "RunState",
    "RunStatus",
    "Saga",
    "SagaStateTooLarge",
    "ScheduleInfo",
    "SerializationError",
    "SignatureInvalid",
    "SignatureMissing",
    "Stall",
    "Step",
    "StepFailed",
    "StepInfo",
    "StepNotInHistory",
    "StepTimeout",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "StoreReadOnly",
    "StoreUnavailable",
    "TraceNode",
    "TraceNotFound",
    "TransactionUnsupported",
    "Tx",
    "UnknownAttribute",
    "UnknownQueue",
    "UnknownSchedule",
    "UnknownStep",
    "UnknownWorkflow",
    "WaitTimeout",
    "WorkerLost",
    "WorkflowCallError",
    "WorkflowCancelled",
    "WorkflowCompensated",
    "WorkflowContext",
    "WorkflowError",
    "WorkflowFailed",
    "heartbeat",
    "http_step",
    "step_info",
]
