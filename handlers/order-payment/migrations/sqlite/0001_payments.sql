-- Payments, owned by the order-payment handler. The orders and
-- order_events tables it also writes come from order-created, whose
-- migrations run first.

CREATE TABLE payments (
    payment_id TEXT NOT NULL PRIMARY KEY,
    order_id   TEXT NOT NULL,
    amount     NUMERIC(12, 2) NULL CHECK (amount >= 0),
    paid_at    TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX payments_order_id ON payments (order_id);
