//! `POST /legacy/orders`: the shape older shop systems send — camelCase fields, prices
//! as decimal strings (`"12.50"`), the customer as a nested object — translated to the
//! producer contract and then accepted exactly as `POST /orders` accepts an order (the
//! same checks, the same event, the same idempotency).
//!
//! Invariant: the translation only renames and converts; every rule is the codec's, and
//! an error names the field as the client spelled it (`customer.email`,
//! `items[0].unitPrice`).
//!
//! ```json
//! {"orderId": "L-1", "customer": {"id": "c-1", "email": "ada@example.com",
//!  "shippingCountry": "US"}, "currency": "USD",
//!  "items": [{"sku": "SKU-1", "quantity": 2, "unitPrice": "12.50"}],
//!  "placedAt": "2026-11-21T10:00:00Z"}
//! ```

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Map, Value};

use super::orders::accept_order;
use super::{ApiError, ApiState, RouteSpec, Store, idempotency_key, json_object};

pub const PLACE_LEGACY: RouteSpec = RouteSpec {
    method: "post",
    path: "/legacy/orders",
    summary: "Place an order in the legacy shape (camelCase, decimal price strings, nested customer)",
    scoped: true,
    idempotent: true,
    query: &[],
    request: Some("LegacyOrderRequest"),
    responses: &[
        (
            202,
            "Accepted: published to order.created",
            Some("Accepted"),
        ),
        (400, "Malformed header or body", Some("Error")),
        (
            422,
            "A rule of the contract is broken (the field is named as sent), or the Idempotency-Key was used for another body",
            Some("Error"),
        ),
        (
            503,
            "The broker or the database is unavailable",
            Some("Error"),
        ),
    ],
};

/// `POST /legacy/orders`.
pub async fn place_legacy(
    State(state): State<ApiState>,
    store: Store,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let legacy = json_object(&body)?;
    let order = translate(&legacy)?;
    accept_order(
        &state,
        &store,
        key.as_deref(),
        "POST /legacy/orders",
        order,
        legacy_field,
    )
    .await
}

/// Top-level renames: (legacy, contract).
const RENAMES: &[(&str, &str)] = &[
    ("orderId", "order_id"),
    ("storeId", "store_id"),
    ("currency", "currency"),
    ("placedAt", "placed_at"),
    ("correlationId", "correlation_id"),
];

/// Customer fields: (legacy under `customer`, contract).
const CUSTOMER: &[(&str, &str)] = &[
    ("id", "customer_id"),
    ("email", "email"),
    ("shippingCountry", "shipping_country"),
];

/// The legacy name of a contract field path (`items[2].unit_price_cents` →
/// `items[2].unitPrice`).
pub fn legacy_field(contract: &str) -> String {
    if let Some(rest) = contract.strip_prefix("items[")
        && let Some((index, field)) = rest.split_once("].")
    {
        let field = match field {
            "unit_price_cents" => "unitPrice",
            other => other,
        };
        return format!("items[{index}].{field}");
    }
    if let Some((legacy, _)) = RENAMES.iter().find(|(_, c)| *c == contract) {
        return (*legacy).to_owned();
    }
    if let Some((legacy, _)) = CUSTOMER.iter().find(|(_, c)| *c == contract) {
        return format!("customer.{legacy}");
    }
    match contract {
        "event_type" => "eventType".into(),
        "causation_id" => "causationId".into(),
        other => other.to_owned(),
    }
}

/// The contract's JSON object for a legacy order. Fields it does not know are left out
/// (and so reported missing by the contract's checks, under their legacy names); a price
/// that is not a decimal string with at most two decimals is an error here.
pub fn translate(legacy: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    for (from, to) in RENAMES {
        if let Some(v) = legacy.get(*from) {
            out.insert((*to).to_owned(), v.clone());
        }
    }
    match legacy.get("customer") {
        None => {}
        Some(Value::Object(c)) => {
            for (from, to) in CUSTOMER {
                if let Some(v) = c.get(*from) {
                    out.insert((*to).to_owned(), v.clone());
                }
            }
        }
        Some(_) => {
            return Err(ApiError::invalid_field(
                Some("customer".into()),
                "customer must be an object {id, email, shippingCountry}",
            ));
        }
    }
    match legacy.get("items") {
        None => {}
        Some(Value::Array(items)) => {
            let mut lines = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let Value::Object(item) = item else {
                    return Err(ApiError::invalid_field(
                        Some(format!("items[{i}]")),
                        "an item must be an object {sku, quantity, unitPrice}",
                    ));
                };
                let mut line = Map::new();
                for f in ["sku", "quantity"] {
                    if let Some(v) = item.get(f) {
                        line.insert(f.to_owned(), v.clone());
                    }
                }
                if let Some(price) = item.get("unitPrice") {
                    let field = format!("items[{i}].unitPrice");
                    let cents = match price {
                        Value::String(s) => parse_price(s)
                            .map_err(|why| ApiError::invalid_field(Some(field.clone()), why))?,
                        _ => {
                            return Err(ApiError::invalid_field(
                                Some(field),
                                "unitPrice must be a decimal string such as \"12.50\"",
                            ));
                        }
                    };
                    line.insert("unit_price_cents".into(), Value::from(cents));
                }
                lines.push(Value::Object(line));
            }
            out.insert("items".into(), Value::Array(lines));
        }
        Some(_) => {
            return Err(ApiError::invalid_field(
                Some("items".into()),
                "items must be an array",
            ));
        }
    }
    Ok(out)
}

/// `"12.50"` → 1250: digits, optionally a point and one or two decimals; never a float.
pub fn parse_price(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not a price: expected a decimal string such as \"12.50\"");
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (s.contains('.') && frac.is_empty())
    {
        return Err(bad());
    }
    if frac.len() > 2 {
        return Err(format!("{s:?} has more than two decimals"));
    }
    let whole: i64 = whole.parse().map_err(|_| bad())?;
    let frac: i64 = format!("{frac:0<2}").parse().map_err(|_| bad())?;
    whole
        .checked_mul(100)
        .and_then(|c| c.checked_add(frac))
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::codec::{Codec, DecodeError, DecodeHints};
    use crate::events::{Event, EventType};
    use serde_json::json;

    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn legacy() -> Value {
        json!({"orderId": "L-1", "storeId": "store-7",
               "customer": {"id": "c-1", "email": "ada@example.com", "shippingCountry": "US"},
               "currency": "USD",
               "items": [{"sku": "SKU-1", "quantity": 2, "unitPrice": "12.50"},
                         {"sku": "SKU-2", "quantity": 1, "unitPrice": "3"}],
               "placedAt": "2026-11-21T10:00:00Z"})
    }

    #[test]
    fn prices_are_decimal_strings() {
        assert_eq!(parse_price("12.50"), Ok(1250));
        assert_eq!(parse_price("12.5"), Ok(1250));
        assert_eq!(parse_price("0.07"), Ok(7));
        assert_eq!(parse_price("3"), Ok(300));
        for bad in [
            "",
            "-1.00",
            "1.",
            ".5",
            "1,50",
            "1.505",
            "12.5e1",
            "abc",
            "99999999999999999999",
        ] {
            assert!(parse_price(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_legacy_order_becomes_the_contracts_event() -> Result<(), Box<dyn std::error::Error>> {
        let contract = translate(&object(legacy())).map_err(|e| e.message)?;
        assert_eq!(
            Value::Object(contract.clone()),
            json!({"order_id": "L-1", "store_id": "store-7", "customer_id": "c-1",
                   "email": "ada@example.com", "shipping_country": "US", "currency": "USD",
                   "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250},
                             {"sku": "SKU-2", "quantity": 1, "unit_price_cents": 300}],
                   "placed_at": "2026-11-21T10:00:00Z"})
        );
        let hints = DecodeHints {
            topic_default: Some(EventType::OrderCreated),
            ..DecodeHints::default()
        };
        let event = Codec::new().decode(&serde_json::to_vec(&contract)?, hints)?;
        let Event::OrderCreated(o) = event else {
            return Err("not an order".into());
        };
        assert_eq!(o.total_cents(), Some(2800));
        Ok(())
    }

    #[test]
    fn errors_name_the_legacy_field() -> Result<(), Box<dyn std::error::Error>> {
        let mut bad = legacy();
        bad["items"][1]["unitPrice"] = json!(3.5);
        let e = translate(&object(bad)).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("items[1].unitPrice"));

        // Rules the codec checks come back under the legacy names.
        let codec = Codec::new();
        let hints = DecodeHints {
            topic_default: Some(EventType::OrderCreated),
            ..DecodeHints::default()
        };
        type Edit = fn(&mut Value);
        let cases: [(&str, Edit); 4] = [
            ("customer.email", |v| {
                drop(v["customer"].as_object_mut().map(|c| c.remove("email")))
            }),
            ("items[0].quantity", |v| {
                v["items"][0]["quantity"] = json!(0)
            }),
            ("currency", |v| v["currency"] = json!("dollars")),
            ("orderId", |v| {
                drop(v.as_object_mut().map(|o| o.remove("orderId")))
            }),
        ];
        for (expected, edit) in cases {
            let mut v = legacy();
            edit(&mut v);
            let contract = translate(&object(v)).map_err(|e| e.message)?;
            match codec.decode(&serde_json::to_vec(&contract)?, hints) {
                Err(DecodeError::Invalid { field: Some(f), .. }) => {
                    assert_eq!(legacy_field(&f), expected);
                }
                other => panic!("{expected}: {other:?}"),
            }
        }
        assert_eq!(
            legacy_field("items[3].unit_price_cents"),
            "items[3].unitPrice"
        );
        assert_eq!(legacy_field("shipping_country"), "customer.shippingCountry");
        Ok(())
    }
}
