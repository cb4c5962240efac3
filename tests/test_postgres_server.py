"""The test suite's own PostgreSQL server (tests/postgres.py) works, for SQLAlchemy and for Optuna's RDB storage."""

from __future__ import annotations

import optuna
import sqlalchemy


def test_postgres_server_answers_sqlalchemy_and_optuna(postgres_url: str, fresh_db: str) -> None:
    assert postgres_url.startswith("postgresql://postgres@127.0.0.1:") and postgres_url.endswith("/bench_test")
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()

    storage = optuna.storages.RDBStorage(fresh_db)
    try:
        study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
        trial_id = storage.create_new_trial(study_id)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.COMPLETE, [0.5])
        assert [t.value for t in storage.get_all_trials(study_id)] == [0.5]
    finally:
        storage.remove_session()
        storage.engine.dispose()
