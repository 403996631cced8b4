//! Invoice feedback from `invoice-events`: an issued invoice closes the
//! periods it bills and stamps their usages with the invoice ids.

use chrono::{DateTime, Utc};

use super::event::{json_string, parse_timestamp, JsonObject};
use super::ids::check_id;

/// One billed period of one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceItem {
    pub invoice_item_id: String,
    pub subscription_id: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
}

/// An `invoice-issued` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceIssued {
    pub invoice_id: String,
    pub issued_time: DateTime<Utc>,
    pub items: Vec<InvoiceItem>,
}

/// Decodes an invoice event; the error says why it is invalid.
pub fn decode_invoice_event(bytes: &[u8]) -> Result<InvoiceIssued, String> {
    let object = JsonObject::from_slice(bytes).map_err(|e| e.to_string())?;
    let string = |o: &JsonObject<'_>, name: &str| -> Result<String, String> {
        let raw = o.given(name).ok_or_else(|| format!("{name} is required"))?;
        json_string(raw).map_err(|m| format!("{name} {m}"))
    };
    let kind = string(&object, "type")?;
    if kind != "invoice-issued" {
        return Err(format!("type {kind:?} is not handled (invoice-issued is)"));
    }
    let invoice_id = string(&object, "invoiceId")?;
    check_id(&invoice_id).map_err(|m| format!("invoiceId {m}"))?;
    let issued_time = parse_timestamp(&string(&object, "issuedTime")?).map_err(|m| format!("issuedTime {m}"))?;
    let items_raw = object.given("items").ok_or("items is required")?;
    let items_list: Vec<&serde_json::value::RawValue> =
        serde_json::from_str(items_raw.get()).map_err(|_| "items must be an array".to_owned())?;
    if items_list.is_empty() {
        return Err("items must not be empty".into());
    }
    let mut items = Vec::with_capacity(items_list.len());
    for (i, raw) in items_list.iter().enumerate() {
        let item = JsonObject::parse(raw.get()).map_err(|e| format!("items[{i}]: {e}"))?;
        let field = |name: &str| string(&item, name).map_err(|m| format!("items[{i}].{m}"));
        let invoice_item_id = field("invoiceItemId")?;
        let subscription_id = field("subscriptionId")?;
        check_id(&invoice_item_id).map_err(|m| format!("items[{i}].invoiceItemId {m}"))?;
        check_id(&subscription_id).map_err(|m| format!("items[{i}].subscriptionId {m}"))?;
        let period_start =
            parse_timestamp(&field("periodStartTime")?).map_err(|m| format!("items[{i}].periodStartTime {m}"))?;
        let period_end =
            parse_timestamp(&field("periodEndTime")?).map_err(|m| format!("items[{i}].periodEndTime {m}"))?;
        if period_end <= period_start {
            return Err(format!("items[{i}]: periodEndTime must be after periodStartTime"));
        }
        items.push(InvoiceItem {
            invoice_item_id,
            subscription_id,
            period_start,
            period_end,
        });
    }
    Ok(InvoiceIssued {
        invoice_id,
        issued_time,
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"{"type": "invoice-issued", "invoiceId": "inv_1", "issuedTime": "2026-12-01T02:00:00Z",
        "items": [{"invoiceItemId": "ii_1", "subscriptionId": "sub_42",
                   "periodStartTime": "2026-11-01T00:00:00Z", "periodEndTime": "2026-12-01T00:00:00Z"}]}"#;

    #[test]
    fn decodes_an_issued_invoice() {
        let invoice = decode_invoice_event(VALID.as_bytes()).unwrap();
        assert_eq!(invoice.invoice_id, "inv_1");
        assert_eq!(invoice.items.len(), 1);
        assert_eq!(invoice.items[0].subscription_id, "sub_42");
    }

    #[test]
    fn rejects_what_it_cannot_apply() {
        for (bad, why) in [
            (VALID.replace("invoice-issued", "invoice-voided"), "not handled"),
            (VALID.replace(r#""invoiceId": "inv_1", "#, ""), "invoiceId is required"),
            (VALID.replace("2026-12-01T02:00:00Z", "yesterday"), "issuedTime"),
            (
                VALID.replace(
                    r#""periodEndTime": "2026-12-01T00:00:00Z""#,
                    r#""periodEndTime": "2026-10-01T00:00:00Z""#,
                ),
                "after",
            ),
            (VALID.replace("sub_42", "sub 42"), "subscriptionId"),
            (
                r#"{"type": "invoice-issued", "invoiceId": "i", "issuedTime": "2026-12-01T02:00:00Z", "items": []}"#
                    .into(),
                "empty",
            ),
            ("[1]".into(), "object"),
        ] {
            let err = decode_invoice_event(bad.as_bytes()).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
