"""Audits, the paper's §5.3 credit by full retrain: exact Shapley of a run's seeds under a protocol
(`retrain`), where the retrains run (`backends`: a process pool or Ray), and cheaper estimators
priced against it (`estimators`). They drive whole runs, so they sit at the jobs' level, above
`esper.run`; the Shapley maths and the critics they feed stay in `esper.simic`."""
