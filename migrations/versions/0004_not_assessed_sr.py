"""result objects for not-assessed instances: prediction_id nullable, job_id and model_id

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 22:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot alter a column or add a foreign key in place.
    with op.batch_alter_table("result_objects") as batch:
        batch.alter_column("prediction_id", existing_type=sa.Integer(), nullable=True)
        batch.add_column(sa.Column("job_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("model_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_result_objects_job_id_jobs", "jobs", ["job_id"], ["id"])
        batch.create_foreign_key(
            "fk_result_objects_model_id_models", "models", ["model_id"], ["id"]
        )


def downgrade() -> None:
    # The not-assessed SRs have no prediction: they cannot stay in the older schema.
    op.execute(
        "DELETE FROM send_jobs WHERE object_id IN "
        "(SELECT id FROM result_objects WHERE prediction_id IS NULL)"
    )
    op.execute(
        "UPDATE result_objects SET predecessor_id = NULL WHERE predecessor_id IN "
        "(SELECT id FROM result_objects WHERE prediction_id IS NULL)"
    )
    op.execute("DELETE FROM result_objects WHERE prediction_id IS NULL")
    with op.batch_alter_table("result_objects") as batch:
        batch.drop_constraint("fk_result_objects_model_id_models", type_="foreignkey")
        batch.drop_constraint("fk_result_objects_job_id_jobs", type_="foreignkey")
        batch.drop_column("model_id")
        batch.drop_column("job_id")
        batch.alter_column("prediction_id", existing_type=sa.Integer(), nullable=False)
