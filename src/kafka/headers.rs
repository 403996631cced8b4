//! Reading message headers without trusting them. rdkafka's own accessor
//! unwraps each key as UTF-8, so one producer writing a key of raw bytes
//! would crash the worker on that message, again after every restart. Kafka
//! defines keys as strings; a key that is not UTF-8 is read lossily here.

use std::ffi::CStr;

use rdkafka::bindings::{rd_kafka_header_cnt, rd_kafka_header_get_all, rd_kafka_headers_t};
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, OwnedMessage};
use rdkafka::Message;

use crate::domain::headers::Headers;

/// Header names (lossy UTF-8) and values (bytes; a null value reads as
/// empty).
pub fn of_owned(message: &OwnedMessage) -> Headers {
    message.headers().map(|h| read(h.as_borrowed())).unwrap_or_default()
}

pub fn of_borrowed(message: &BorrowedMessage<'_>) -> Headers {
    message.headers().map(read).unwrap_or_default()
}

/// Reads the headers through librdkafka's own calls (rdkafka's accessor
/// would panic on a key that is not UTF-8).
fn read(headers: &BorrowedHeaders) -> Headers {
    // `BorrowedHeaders` is rdkafka's transparent view of a native
    // `rd_kafka_headers_t` (rdkafka casts it the same way); the pointers
    // librdkafka returns stay valid while `headers` is borrowed, and are
    // copied out before it ends.
    let native = headers as *const BorrowedHeaders as *const rd_kafka_headers_t;
    // SAFETY: `native` points to live headers (see above).
    let count = unsafe { rd_kafka_header_cnt(native) };
    let mut list = Headers::with_capacity(count);
    for index in 0..count {
        let mut name = std::ptr::null();
        let mut value = std::ptr::null();
        let mut size = 0;
        // SAFETY: `index` is below the count; librdkafka writes the three
        // out-parameters only.
        let err = unsafe { rd_kafka_header_get_all(native, index, &mut name, &mut value, &mut size) };
        if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: a header name is a NUL-terminated string owned by the
        // headers, checked non-null above.
        let key = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
        let bytes = if value.is_null() {
            Vec::new()
        } else {
            // SAFETY: librdkafka gives the value's length with its pointer,
            // owned by the headers, checked non-null.
            unsafe { std::slice::from_raw_parts(value as *const u8, size) }.to_vec()
        };
        list.push(key, bytes);
    }
    list
}
