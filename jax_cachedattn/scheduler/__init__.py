"""Scheduler-aware fetching and eviction: the job queue, its look-ahead windows, and the policies
the store evicts by (see `scheduler.Scheduler` and `policies`)."""

from .policies import FIFO, LFU, LRU, POLICIES, Belady, QueueAwarePolicy, make_policy
from .predictor import NextTurnPredictor
from .queue import Job, JobQueue
from .scheduler import Scheduler, SchedulerConfig, StoreView

__all__ = [
    "Belady", "FIFO", "Job", "JobQueue", "LFU", "LRU", "NextTurnPredictor", "POLICIES", "QueueAwarePolicy",
    "Scheduler", "SchedulerConfig", "StoreView", "make_policy",
]
