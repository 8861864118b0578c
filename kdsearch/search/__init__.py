"""`kdsearch run`: trials on Ray Tune with ASHA, proposed by Optuna, recorded by `study.record`.

The only package that imports Ray. The driver loads the data and prepares the teacher (and its
heads) once, puts them in Ray's object store, and starts trials that each train one recipe for
at most `asha.max_epochs`, reporting every epoch (`worker`). Proposals and the record both live
in the study: `tuner.KdSearcher` asks Optuna for a trial when Tune has a free slot and tells it
the outcome itself, so a trial ASHA stopped is PRUNED (Ray's OptunaSearch would call it COMPLETE)
and a search killed half-way resumes from the database alone, without Tune's experiment
checkpoint. `jobs` runs a promotion's full trainings on the same workers' code, and `cluster`
starts or joins Ray and watches it.
"""
