-- Orders and their history, owned by the order-created handler.
-- order-payment (migrated after this handler) updates orders and appends
-- to order_events too. Timestamps are CURRENT_TIMESTAMP text (UTC).

CREATE TABLE orders (
    order_id    TEXT NOT NULL PRIMARY KEY,
    customer_id TEXT NOT NULL,
    total       NUMERIC(12, 2) NOT NULL CHECK (total >= 0),
    status      TEXT NOT NULL DEFAULT 'pending',
    created_at  TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at  TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- One row per committed handler run that changed an order: the audit
-- trail, and the proof in tests that a handler ran exactly once.
CREATE TABLE order_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id     TEXT NOT NULL,
    kind         TEXT NOT NULL,
    event_source TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    recorded_at  TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX order_events_order_id ON order_events (order_id);
