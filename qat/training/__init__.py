"""Running QAT: the phase switches (:mod:`~qat.training.control`), the schedule that sets them by
step or epoch (:mod:`~qat.training.schedule`), post-training calibration
(:mod:`~qat.training.calibrate`) and how a batch reaches the model (:mod:`~qat.training.batches`)."""
