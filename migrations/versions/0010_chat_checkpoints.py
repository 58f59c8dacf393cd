"""One statement checkpoints every reply generating on a replica.

A replica used to run a transaction per reply every 0.2 s (text so far, seq, lease, a
`message_events` row and NOTIFY), so its database work grew with the number of replies and their
duration. Now one writer per replica calls `app_chat_checkpoint` once per tick with arrays: the
replies whose checkpoint is due get their text, seq and lease stored with one `message_events` row
each; the others are only announced (NOTIFY carries their events since the last stored checkpoint).

The replies belong to many users, so this runs as the schema owner (SECURITY DEFINER), like the other
`app_` functions; it only touches the (id, user_id) pairs it is given, only while they are
GENERATING, and returns the ids it was given that are no longer generating (finished elsewhere
after their lease ran out, or deleted), so their replica stops generating them.

A checkpoint repeated after a commit whose answer was lost stores the same (or a longer) batch
again: the `message_events` row is replaced, never duplicated.

Revision ID: 0010_chat_checkpoints
Revises: 0009_stale_work
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010_chat_checkpoints"
down_revision: str | None = "0009_stale_work"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIGNATURE = "uuid[], uuid[], text[], bigint[], bigint[], text[], double precision, uuid[], text[], text[]"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION app_chat_checkpoint(
          p_ids uuid[],            -- replies to store (text, seq, lease; a batch when data is given)
          p_users uuid[],          -- their owners
          p_contents text[],       -- the text so far (NULL: a heartbeat, the lease only)
          p_seqs bigint[],         -- the last stored seq (NULL with a heartbeat)
          p_firsts bigint[],       -- the batch's first seq (NULL with a heartbeat)
          p_datas text[],          -- the batch, encoded by chat.events (NULL with a heartbeat)
          p_lease_seconds double precision,
          p_notify_ids uuid[],     -- NOTIFY, in order: for which reply (skipped when it is lost),
          p_channels text[],       -- on which channel,
          p_payloads text[]        -- with what
        ) RETURNS SETOF uuid
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
        DECLARE
          lost uuid[];
        BEGIN
          WITH c AS (
            SELECT * FROM unnest(p_ids, p_users, p_contents, p_seqs, p_firsts, p_datas)
              AS c(id, user_id, content, seq, seq_first, data)
          ), alive AS (
            UPDATE messages m
               SET content = COALESCE(c.content, m.content),
                   seq = COALESCE(c.seq, m.seq),
                   lease_expires_at = now() + make_interval(secs => p_lease_seconds)
              FROM c
             WHERE m.id = c.id AND m.user_id = c.user_id AND m.status = 'generating'
            RETURNING m.id
          ), stored AS (
            INSERT INTO message_events (message_id, seq_first, seq_last, user_id, data)
            SELECT c.id, c.seq_first, c.seq, c.user_id, c.data
              FROM c JOIN alive USING (id)
             WHERE c.data IS NOT NULL
            ON CONFLICT (message_id, seq_first)
              DO UPDATE SET seq_last = EXCLUDED.seq_last, data = EXCLUDED.data
          )
          SELECT coalesce(array_agg(c.id), '{}') INTO lost
            FROM c WHERE c.id NOT IN (SELECT id FROM alive);

          PERFORM pg_notify(n.channel, n.payload)
             FROM unnest(p_notify_ids, p_channels, p_payloads) WITH ORDINALITY AS n(id, channel, payload, i)
            WHERE NOT (n.id = ANY (lost))
            ORDER BY n.i;

          RETURN QUERY SELECT unnest(lost);
        END
        $$
        """
    )
    op.execute("SELECT app_grant_application_role()")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION IF EXISTS app_chat_checkpoint({SIGNATURE})")
